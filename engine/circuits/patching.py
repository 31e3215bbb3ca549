"""Whether the model does the task, and the reference circuit by intervention on each head.

The metric of a prompt is ``logsumexp(logits[answers]) - logsumexp(logits[wrongs])`` at its last position: the
logit difference when both are one token (IOI, JSONL tasks), the log-odds of a later year for greater-than, of the
right argument against the other three for docstring. A prompt is answered when it is > 0.

Activation patching of head (L, h): its ``z`` (hence its output ``z W_O^h``) at every position is taken from the
counterfactual run into the clean run; mean-ablation takes the mean over the group's clean and counterfactual
prompts at each position. The effect is normalised as ``(LD_clean - LD_patched) / (LD_clean - LD_counterfactual)``
with means over the pairs: 0 = no change, 1 = as bad as the counterfactual. Each head's run resumes at its layer
from the clean residual stream (``model.tail``), so earlier layers are not recomputed, and all heads of a layer run
as one batch of copies of the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.hooks import interventions
from ..model.loading import LoadedModel
from ..model.tail import can_resume, resume_logits
from .tasks import Task, TaskPair


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _resid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def groups(task: Task) -> dict[int, list[int]]:
    """Pair indices by prompt length (the prompts of a group run as one batch, unpadded)."""
    out: dict[int, list[int]] = {}
    for i, pair in enumerate(task.pairs):
        out.setdefault(len(pair.prompt_ids), []).append(i)
    return out


def metric(logits: torch.Tensor, pairs: Sequence[TaskPair]) -> np.ndarray:
    """Each pair's metric from its last-position logits ``[batch, vocab]``."""
    rows = logits.float()
    return np.array([float(torch.logsumexp(rows[i, list(p.answer_ids)], 0) - torch.logsumexp(rows[i, list(p.wrong_ids)], 0))
                     for i, p in enumerate(pairs)])


@torch.inference_mode()
def run_with_cache(lm: LoadedModel, ids: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``[batch, pos, vocab]`` and the activations at ``names`` of one full forward."""
    store: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def fn(act: torch.Tensor) -> None:
            store[name] = act.detach().clone()

        return fn

    with interventions(lm.hooks, [(n, grab(n)) for n in names]):
        logits = lm.logits(ids)
    return logits, store


def pair_ids(pairs: Sequence[TaskPair], counterfactual: bool = False) -> torch.Tensor:
    """``[batch, pos]``: the prompts (or counterfactuals) of pairs of one length."""
    return torch.tensor([p.counterfactual_ids if counterfactual else p.prompt_ids for p in pairs], dtype=torch.long)


@dataclass(frozen=True)
class Performance:
    """How well the model does the task."""

    accuracy: float
    """Fraction of positive prompts whose metric is > 0 (right answer over wrong answer)."""
    top1: float
    """Fraction of positive prompts whose most likely next token is a right answer."""
    logit_diff: float
    """Mean metric on the positive prompts."""
    logit_diff_counterfactual: float
    """Mean metric on the counterfactual prompts (same answer tokens)."""
    per_prompt: tuple[float, ...]
    per_counterfactual: tuple[float, ...]

    def does_task(self, min_accuracy: float) -> bool:
        """At least ``min_accuracy`` answered, and a larger logit difference than on the counterfactuals (0: no
        check at all)."""
        return min_accuracy <= 0 or (self.accuracy >= min_accuracy and self.logit_diff > self.logit_diff_counterfactual)


@torch.inference_mode()
def resolve_wrong(lm: LoadedModel, task: Task) -> Task:
    """Pairs without a wrong answer get the clean prompt's most likely token other than the answer."""
    if all(p.wrong_ids for p in task.pairs):
        return task
    pairs = list(task.pairs)
    for members in groups(task).values():
        logits = lm.logits(pair_ids([pairs[i] for i in members]))[:, -1].float()
        for row, i in enumerate(members):
            if not pairs[i].wrong_ids:
                ranked = [int(t) for t in logits[row].topk(len(pairs[i].answer_ids) + 1).indices]
                wrong = next(t for t in ranked if t not in pairs[i].answer_ids)
                shown = lm.tokenizer.decode([wrong])
                pairs[i] = replace(pairs[i], wrong_ids=(wrong,), wrong=shown)
    return replace(task, pairs=tuple(pairs))


@torch.inference_mode()
def performance(lm: LoadedModel, task: Task) -> Performance:
    """Accuracy and mean logit difference of the model on the task and on its counterfactuals."""
    clean = np.zeros(len(task.pairs))
    cf = np.zeros(len(task.pairs))
    top1 = np.zeros(len(task.pairs), dtype=bool)
    for members in groups(task).values():
        pairs = [task.pairs[i] for i in members]
        last = lm.logits(pair_ids(pairs))[:, -1]
        clean[members] = metric(last, pairs)
        top1[members] = [int(last[r].argmax()) in p.answer_ids for r, p in enumerate(pairs)]
        cf[members] = metric(lm.logits(pair_ids(pairs, counterfactual=True))[:, -1], pairs)
    return Performance(float(np.mean(clean > 0)), float(top1.mean()), float(clean.mean()), float(cf.mean()),
                       tuple(clean.tolist()), tuple(cf.tolist()))


def _replace_head(head: int, source: torch.Tensor):
    def fn(z: torch.Tensor) -> torch.Tensor:
        out = z.clone()
        out[:, :, head] = source[:, :, head].to(z.dtype)
        return out

    return fn


def _replace_heads(sources: list[torch.Tensor], blocks: list[tuple[int, int]]):
    """For ``z`` of ``len(blocks)`` copies of a batch: copy i gets head ``h`` from ``sources[k]`` where
    ``(k, h) = blocks[i]`` (each source ``[batch, pos, n_heads, d_head]``)."""

    def fn(z: torch.Tensor) -> torch.Tensor:
        out = z.clone().unflatten(0, (len(blocks), -1))
        for i, (k, h) in enumerate(blocks):
            out[i, :, :, h] = sources[k][:, :, h].to(z.dtype)
        return out.flatten(0, 1)

    return fn


@torch.inference_mode()
def patch_heads(lm: LoadedModel, ids: torch.Tensor, heads: Sequence[tuple[int, int]],
                sources: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of a full forward on ``ids`` with the ``z`` of each ``(layer, head)`` replaced by ``sources[layer]``
    (``[batch, pos, n_heads, d_head]``, broadcastable)."""
    fns = [(_z(layer), _replace_head(head, sources[layer])) for layer, head in heads]
    with interventions(lm.hooks, fns):
        return lm.logits(ids)


@dataclass(frozen=True)
class PatchResult:
    """Normalised effect of each head (``[n_layers, n_heads]``) under patching and mean-ablation."""

    patch: np.ndarray
    mean_ablation: np.ndarray
    logit_diff_clean: float
    logit_diff_counterfactual: float


@torch.inference_mode()
def patch_scan(lm: LoadedModel, task: Task, *, mean_ablation: bool = True) -> PatchResult:
    """Patch each head from the counterfactual (and mean-ablate it) and measure the normalised effect."""
    n_pairs, L, H = len(task.pairs), lm.n_layers, lm.n_heads
    patched = np.zeros((L, H, n_pairs))
    ablated = np.zeros((L, H, n_pairs))
    clean_ld = np.zeros(n_pairs)
    cf_ld = np.zeros(n_pairs)
    names = [_z(layer) for layer in range(L)]
    resumable = all(can_resume(lm, _resid(layer)) for layer in range(L))
    for members in groups(task).values():
        pairs = [task.pairs[i] for i in members]
        ids, cf_ids = pair_ids(pairs), pair_ids(pairs, counterfactual=True)
        logits, clean_cache = run_with_cache(lm, ids, [*names, *(_resid(layer) for layer in range(L))])
        clean_ld[members] = metric(logits[:, -1], pairs)
        cf_logits, cf_cache = run_with_cache(lm, cf_ids, names)
        cf_ld[members] = metric(cf_logits[:, -1], pairs)
        for layer in range(L):
            sources = [cf_cache[_z(layer)]]
            if mean_ablation:
                both = torch.cat([clean_cache[_z(layer)], cf_cache[_z(layer)]])
                sources.append(both.mean(0, keepdim=True).expand_as(cf_cache[_z(layer)]))
            # batches of copies of the clean prompts, copy (k, h) with head h replaced from sources[k]; the logits
            # of a batch stay under ~256 MB
            blocks = [(k, h) for k in range(len(sources)) for h in range(H)]
            step = max(1, int(2**26 // (len(pairs) * ids.shape[1] * lm.hf_model.config.vocab_size)))
            for at in range(0, len(blocks), step):
                chunk = blocks[at:at + step]
                with lm.hooks.intervene(_z(layer), _replace_heads(sources, chunk)):
                    if resumable:
                        resid = clean_cache[_resid(layer)].repeat(len(chunk), 1, 1)
                        last = resume_logits(lm, _resid(layer), resid)[:, -1]
                    else:
                        last = lm.logits(ids.repeat(len(chunk), 1))[:, -1]
                values = metric(last, pairs * len(chunk)).reshape(len(chunk), len(pairs))
                for (k, h), row in zip(chunk, values, strict=True):
                    (patched if k == 0 else ablated)[layer, h, members] = row
    gap = clean_ld.mean() - cf_ld.mean()
    if abs(gap) < 1e-6:
        raise ValueError("the clean and counterfactual prompts give the same mean logit difference: no effect to "
                         "normalise")
    return PatchResult((clean_ld.mean() - patched.mean(-1)) / gap,
                       (clean_ld.mean() - ablated.mean(-1)) / gap if mean_ablation else np.full((L, H), np.nan),
                       float(clean_ld.mean()), float(cf_ld.mean()))
