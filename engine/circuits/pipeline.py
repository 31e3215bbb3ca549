"""One circuit run: does the model do the task; the seed method's scores; the patching circuit; how they agree."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..model.loading import LoadedModel
from .codes import CodeSAEConfig, train_code_sae
from .heads import OutputProjection, head_results, output_projection
from .patching import PatchResult, Performance, groups, patch_scan, performance, resolve_wrong, run_with_cache
from .path_patching import path_patch_scan
from .scores import (
    Operating,
    Roc,
    edge_scores,
    operating_point,
    roc,
    softmax,
    unique_cooccurrences,
    unique_to_positive,
)
from .tasks import Task

PUBLISHED: dict[str, tuple[tuple[int, int], ...]] = {
    # Wang et al. 2022, the 26 heads of GPT-2 small's IOI circuit, as the reference lists them
    "ioi": ((2, 2), (4, 11), (0, 1), (3, 0), (0, 10), (5, 5), (6, 9), (5, 8), (5, 9), (7, 3), (7, 9), (8, 6), (8, 10),
            (10, 7), (11, 10), (9, 9), (9, 6), (10, 0), (10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (11, 9), (11, 3),
            (9, 7)),
    # Hanna et al. 2023, GPT-2 small's greater-than heads, as the reference lists them
    "greater-than": ((0, 3), (0, 5), (0, 1), (5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)),
}
"""Published head sets of GPT-2 small (12 layers x 12 heads). The reference's docstring set belongs to a
TransformerLens 4-layer attention-only model that transformers cannot load, so it is not here."""
GPT2_NAMES = ("gpt2", "openai-community/gpt2")


@dataclass(frozen=True)
class CircuitConfig(CodeSAEConfig):
    """A circuit run (the SAE's fields are the reference's defaults)."""

    n_prompts: int = 40
    """Prompt pairs generated for a built-in task (a JSONL task uses all its rows)."""
    position: str = "mean"
    """Head outputs averaged over positions ('mean', as the reference) or taken at the final one ('last')."""
    normalise: bool = False
    """Divide the node/edge counts by the distinct codes (the reference's option; off in its results)."""
    min_accuracy: float = 0.6
    """Refuse to find a circuit when fewer positive prompts than this are answered right, or when the logit difference
    is no larger than on the counterfactuals (0: never refuse)."""
    patch_prompts: int = 10
    """Pairs patched (each head costs one partial forward of them)."""
    mean_ablation: bool = True
    """Also mean-ablate each head."""
    circuit_threshold: float = 0.05
    """A head is in the patching circuit when |normalised patching effect| is at least this."""
    path_patching: bool = False
    """Also path-patch each head's direct path to the logits (its counterfactual output into the final residual only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position not in ("mean", "last"):
            raise ValueError(f"position must be 'mean' or 'last', got {self.position!r}")
        if self.n_prompts < 2 or self.patch_prompts < 1:
            raise ValueError(f"n_prompts must be >= 2 and patch_prompts >= 1, got {self.n_prompts}, {self.patch_prompts}")

    def sae(self) -> CodeSAEConfig:
        return CodeSAEConfig(**{f.name: getattr(self, f.name) for f in fields(CodeSAEConfig)})


@dataclass(frozen=True)
class Agreement:
    """How a head score ranks a reference circuit."""

    reference: str
    """'patching' (saescope's) or 'published'."""
    method: str
    """'node' or 'edge'."""
    roc: Roc
    point: Operating


@dataclass(frozen=True)
class CircuitResult:
    """Everything one run computes (heads flattened layer-major)."""

    task: Task
    performance: Performance
    codes: np.ndarray
    """``[2 * n_pairs, n_heads]``: positives first, then their counterfactuals."""
    unique_positive: np.ndarray
    node: np.ndarray
    pair_counts: np.ndarray
    edge: np.ndarray
    patching: PatchResult
    path: np.ndarray | None
    """``[n_layers, n_heads]`` normalised direct-path patching effects (None when not asked for)."""
    circuit: np.ndarray
    """``[n_layers, n_heads]`` bool: the patching circuit."""
    agreements: tuple[Agreement, ...]
    timings: dict[str, float]
    n_layers: int
    n_heads: int
    config: CircuitConfig
    sae_final_loss: float


def refuse_if_not_done(task: Task, perf: Performance, min_accuracy: float) -> None:
    """A ValueError saying the model does not do the task (so no circuit is computed on noise)."""
    if not perf.does_task(min_accuracy):
        raise ValueError(
            f"the model does not do the {task.name} task: {perf.accuracy:.0%} of {len(perf.per_prompt)} prompts "
            f"answered right (needs {min_accuracy:.0%}), mean logit difference {perf.logit_diff:+.2f} vs "
            f"{perf.logit_diff_counterfactual:+.2f} on the counterfactuals; no circuit is computed")


@torch.inference_mode()
def head_features(lm: LoadedModel, task: Task, position: str,
                  projections: list[OutputProjection]) -> torch.Tensor:
    """``[2 * n_pairs, n_layers * n_heads, d_model]``: each head's output, position-mean or last, of the positive
    prompts then of the counterfactuals."""
    n = len(task.pairs)
    out = torch.zeros(2 * n, lm.n_layers * lm.n_heads, lm.d_model)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(lm.n_layers)]
    for members in groups(task).values():
        for offset, attr in ((0, "prompt_ids"), (n, "counterfactual_ids")):
            ids = torch.tensor([getattr(task.pairs[i], attr) for i in members], dtype=torch.long)
            _, cache = run_with_cache(lm, ids, names)
            per_layer = [head_results(cache[name], p) for name, p in zip(names, projections, strict=True)]
            stacked = torch.stack(per_layer, dim=2)  # [batch, pos, layers, heads, d_model]
            pooled = stacked.mean(1) if position == "mean" else stacked[:, -1]
            out[[offset + i for i in members]] = pooled.flatten(1, 2).cpu()
    return out


def agreement(reference: str, method: str, truth: np.ndarray, scores: np.ndarray) -> Agreement | None:
    if truth.all() or not truth.any():
        return None
    curve = roc(truth, scores)
    return Agreement(reference, method, curve, operating_point(truth, scores, curve))


def published_circuit(lm: LoadedModel, task_name: str) -> np.ndarray | None:
    """The published head set of this task for GPT-2 small, when that is the model."""
    heads = PUBLISHED.get(task_name)
    if heads is None or lm.name not in GPT2_NAMES or (lm.n_layers, lm.n_heads) != (12, 12):
        return None
    truth = np.zeros((12, 12), dtype=bool)
    for layer, head in heads:
        truth[layer, head] = True
    return truth


def run_circuit(lm: LoadedModel, task: Task, cfg: CircuitConfig) -> CircuitResult:
    """The whole run; a ValueError when the model does not do the task."""
    task = resolve_wrong(lm, task)
    perf = performance(lm, task)
    refuse_if_not_done(task, perf, cfg.min_accuracy)
    n = len(task.pairs)
    start, cpu = time.perf_counter(), time.process_time()
    projections = [output_projection(lm, layer) for layer in range(lm.n_layers)]
    x = head_features(lm, task, cfg.position, projections)
    forward_s = time.perf_counter() - start
    sae = train_code_sae(x, cfg.sae())
    codes = sae.codes(x).numpy()
    pos, neg = codes[:n], codes[n:]
    unique = unique_to_positive(pos, neg, cfg.normalise)
    node = softmax(unique)
    pair_counts = unique_cooccurrences(pos, neg, cfg.normalise)
    edge = edge_scores(pair_counts)
    code_s, code_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    patch_task = Task(task.name, task.pairs[: cfg.patch_prompts]) if cfg.patch_prompts < n else task
    patched = patch_scan(lm, patch_task, mean_ablation=cfg.mean_ablation)
    patch_s, patch_cpu = time.perf_counter() - start, time.process_time() - cpu
    timings = {"code_method_s": code_s, "code_forward_s": forward_s, "patching_s": patch_s,
               "code_method_cpu_s": code_cpu, "patching_cpu_s": patch_cpu}
    path = None
    if cfg.path_patching:
        start = time.perf_counter()
        path = path_patch_scan(lm, patch_task)
        timings["path_patching_s"] = time.perf_counter() - start
    circuit = np.abs(patched.patch) >= cfg.circuit_threshold
    truths = {"patching": circuit.ravel()}
    published = published_circuit(lm, task.name)
    if published is not None:
        truths["published"] = published.ravel()
    found = [agreement(ref, method, truth, scores) for ref, truth in truths.items()
             for method, scores in (("node", node), ("edge", edge))]
    return CircuitResult(task, perf, codes, unique, node, pair_counts, edge, patched, path, circuit,
                         tuple(a for a in found if a is not None), timings, lm.n_layers, lm.n_heads, cfg, sae.losses[-1])
