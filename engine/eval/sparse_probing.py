"""Sparse probing as SAEBench defines it (``sae_bench/evals/sparse_probing``), on texts of the demo corpus.

Each text (at most ``max_tokens`` tokens) is one example: the mean over its counted tokens (position 0, special
and massive-activation tokens left out, as everywhere in saescope; SAEBench leaves out BOS/EOS/pad) of the
activation at the hook, and of the SAE's codes. Per dataset, each class is one binary task: its texts against as
many texts drawn evenly from the other classes, on the train and test side alike (a two-class dataset is one
task). Per task and k, the k latents with the largest ``|mean(class) - mean(rest)|`` on the train side are kept
and a logistic regression (scikit-learn's default L2, C = 1) is fitted on them; the metric is its test accuracy.
The ceiling is the same probe on all ``d_in`` dimensions of the raw activation (SAEBench trains that one with
Adam and early stopping; here it is the exact optimum of the same L2 objective), and the same top-k rule on the
raw dimensions is reported too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..analysis.interventions import compute_copy
from ..data.text_values import text_batches
from ..model.loading import LoadedModel
from ..saes import SAE
from .probe import accuracy, fit_logistic, top_k_mean_diff
from .probing_data import Dataset

K_VALUES = (1, 2, 5, 10, 20)


class Pooled(NamedTuple):
    """Mean activations of each text over its counted tokens."""

    raw: np.ndarray
    """``[n, d_in]`` float64."""
    codes: np.ndarray
    """``[n, d_sae]`` float32."""
    n_tokens: np.ndarray
    """``[n]`` counted tokens (0: the text is unusable)."""


class Row(NamedTuple):
    """One result row (the columns of ``storage.EVALUATION_SCHEMA``)."""

    group: str
    metric: str
    task: str | None
    k: int | None
    value: float
    n: int | None
    latents: list[int] | None = None


@dataclass
class ProbingConfig:
    ks: tuple[int, ...] = K_VALUES
    """Latents per sparse probe."""
    train_per_class: int = 400
    """Texts per class on the train side (at most)."""
    test_per_class: int = 100
    """Texts per class on the test side (at most)."""
    max_tokens: int = 128
    """Tokens per text (SAEBench's context length)."""
    batch_size: int = 16
    seed: int = 0


@torch.inference_mode()
def pooled(lm: LoadedModel, sae: SAE, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 16) -> Pooled:
    """Mean raw activations and SAE codes of each text over its counted tokens (texts batched by length,
    right-padded: a causal model's earlier positions do not see the padding)."""
    run = compute_copy(sae, lm)
    raw = np.zeros((len(texts), sae.cfg.d_in))
    codes = np.zeros((len(texts), sae.cfg.d_sae), dtype=np.float32)
    counts = np.zeros(len(texts), dtype=np.int64)
    for rows, acts, mask in text_batches(lm, sae, texts, max_tokens, batch_size):
        if not mask.any():
            continue
        x = acts[mask]
        row_of = torch.nonzero(mask)[:, 0].cpu()
        out = run(x.to(run.device)).codes.float().cpu()
        n = torch.bincount(row_of, minlength=len(rows)).double()
        sum_raw = torch.zeros(len(rows), x.shape[-1], dtype=torch.float64).index_add_(0, row_of, x.double().cpu())
        sum_codes = torch.zeros(len(rows), out.shape[-1]).index_add_(0, row_of, out)
        keep = n > 0
        idx = torch.tensor(rows)[keep].numpy()
        raw[idx] = (sum_raw[keep] / n[keep, None]).numpy()
        codes[idx] = (sum_codes[keep] / n[keep, None].float()).numpy()
        counts[idx] = n[keep].long().numpy()
    return Pooled(raw, codes, counts)


def task_examples(per_class: dict[str, list[int]], positive: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SAEBench's binary task: every text of ``positive`` and as many others, drawn evenly from the other
    classes (topped up from the larger ones when one is short), shuffled; returns text indices and 0/1 labels."""
    pos = np.asarray(per_class[positive])
    others = [c for c in per_class if c != positive]
    per = math.ceil(len(pos) / len(others))
    shuffled = [rng.permutation(per_class[c]) for c in others]
    neg = np.concatenate([s[:per] for s in shuffled])
    if len(neg) < len(pos):  # a small class gave fewer: the others make up the difference (SAEBench assumes enough)
        rest = np.concatenate([s[per:] for s in shuffled])
        neg = np.concatenate([neg, rng.permutation(rest)[: len(pos) - len(neg)]])
    neg = rng.permutation(neg)[: len(pos)]
    idx = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def probe_dataset(data: Dataset, pool: Pooled, cfg: ProbingConfig) -> list[Row]:
    """Every task of ``data``: the dense ceiling, and k-sparse probes on raw dimensions and on SAE latents."""
    rng = np.random.default_rng(cfg.seed)
    usable = {cls: [i for i in ids if pool.n_tokens[i] > 0] for cls, ids in data.train.items()}
    usable_test = {cls: [i for i in ids if pool.n_tokens[i] > 0] for cls, ids in data.test.items()}
    rows: list[Row] = []
    classes = list(usable)[:1] if len(usable) == 2 else list(usable)  # two classes: one task, not its mirror
    for cls in classes:
        task = f"{data.name}/{cls}"
        tr, y_tr = task_examples(usable, cls, rng)
        te, y_te = task_examples(usable_test, cls, rng)
        dense = fit_logistic(pool.raw[tr], y_tr)
        rows.append(Row("sparse_probing", "llm_accuracy", task, None, accuracy(dense, pool.raw[te], y_te), len(te)))
        for name, x in (("llm", pool.raw), ("sae", pool.codes)):
            for k in cfg.ks:
                cols = top_k_mean_diff(x[tr], y_tr, k)
                probe = fit_logistic(x[tr][:, cols], y_tr)
                acc = accuracy(probe, x[te][:, cols], y_te)
                rows.append(Row("sparse_probing", f"{name}_top_k_accuracy", task, k, acc, len(te),
                                [int(c) for c in cols] if name == "sae" else None))
    return rows


def means(rows: list[Row]) -> list[Row]:
    """Per-dataset means over its tasks (task = the dataset's name) and the mean over datasets (task = None)."""
    out: list[Row] = []
    keys = sorted({(r.metric, r.k if r.k is not None else -1) for r in rows})
    for metric, k in keys:
        same = [r for r in rows if r.metric == metric and (r.k if r.k is not None else -1) == k]
        per_data: dict[str, list[float]] = {}
        for r in same:
            per_data.setdefault((r.task or "").split("/")[0], []).append(r.value)
        k_value = None if k < 0 else k
        for name, values in per_data.items():
            out.append(Row("sparse_probing", metric, name, k_value, float(np.mean(values)), len(values)))
        out.append(Row("sparse_probing", metric, None, k_value, float(np.mean([np.mean(v) for v in per_data.values()])),
                       len(per_data)))
    return out
