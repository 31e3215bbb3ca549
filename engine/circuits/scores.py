"""Node and edge scores from codes, as the reference computes them (``node.py``, ``edge.py``), and the ROC maths.

Codes are ``[n_prompts, n_heads]`` integer arrays (heads flattened layer-major: ``layer * heads_per_layer + head``).
- Node: for each head, the number of distinct codes seen on positives and never on negatives (optionally divided by
  the number of distinct codes on both); the scores of all heads then go through one softmax.
- Edge: for each ordered pair of different heads, the number of distinct code pairs ``(c1, c2)`` co-occurring on some
  positive prompt and on no negative one (optionally divided by the distinct pairs on positives plus those on
  negatives). Pairs are ranked by that count (descending; ties: the higher flat index ``h1 * n + h2`` first, the
  order of a stable argsort reversed), each ranked pair lists its two heads, the first ``n_heads ** 2 // 2`` heads
  of that list are counted, and the counts go through a softmax. The reference builds a dense
  ``[n, n, n_latents, n_latents]`` co-occurrence array; here distinct pairs are counted directly (same counts).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax of a vector (shifted by its max: the same values, no overflow)."""
    e = np.exp(x - np.max(x))
    return e / e.sum()


def unique_to_positive(pos: np.ndarray, neg: np.ndarray, normalise: bool = False) -> np.ndarray:
    """``[n_heads]``: distinct codes of each head on positives and not on negatives."""
    out = np.zeros(pos.shape[1])
    for h in range(pos.shape[1]):
        p, n = set(pos[:, h].tolist()), set(neg[:, h].tolist())
        out[h] = len(p - n) / len(p | n) if normalise else len(p - n)
    return out


def node_scores(pos: np.ndarray, neg: np.ndarray, normalise: bool = False) -> np.ndarray:
    """The reference's node prediction: softmax over heads of ``unique_to_positive``."""
    return softmax(unique_to_positive(pos, neg, normalise))


def _pair_keys(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Distinct ``(h1, h2, c1, c2)`` as one integer ``(h1 * n + h2) * n_codes**2 + c1 * n_codes + c2``, h1 != h2."""
    n = codes.shape[1]
    c = codes.astype(np.int64)
    keys = (np.arange(n * n, dtype=np.int64).reshape(n, n)[None] * n_codes**2
            + c[:, :, None] * n_codes + c[:, None, :])
    off_diagonal = ~np.eye(n, dtype=bool)
    return np.unique(keys[:, off_diagonal])


def unique_cooccurrences(pos: np.ndarray, neg: np.ndarray, normalise: bool = False) -> np.ndarray:
    """``[n_heads, n_heads]``: distinct code pairs of each head pair on positives and not on negatives."""
    n = pos.shape[1]
    n_codes = int(max(pos.max(initial=0), neg.max(initial=0))) + 1
    p_keys, n_keys = _pair_keys(pos, n_codes), _pair_keys(neg, n_codes)
    unique = np.setdiff1d(p_keys, n_keys, assume_unique=True)
    counts = np.bincount(unique // n_codes**2, minlength=n * n).astype(float)
    if normalise:
        total = (np.bincount(p_keys // n_codes**2, minlength=n * n)
                 + np.bincount(n_keys // n_codes**2, minlength=n * n)).astype(float)
        counts = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    return counts.reshape(n, n)


def edge_scores(pair_counts: np.ndarray, k: int | None = None) -> np.ndarray:
    """The reference's edge prediction from ``unique_cooccurrences``: head counts among the top-ranked pairs' heads
    (the first ``k`` of them, ``n_heads ** 2 // 2`` by default), through a softmax."""
    n = pair_counts.shape[0]
    k = n * n // 2 if k is None else k
    order = np.argsort(pair_counts.ravel(), kind="stable")[::-1]
    heads = np.stack([order // n, order % n], axis=1).ravel()[:k]
    return softmax(np.bincount(heads, minlength=n).astype(float))


class Roc(NamedTuple):
    """An ROC curve (points at decreasing thresholds, starting at (0, 0)) and its area."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


def roc(y_true: np.ndarray, scores: np.ndarray) -> Roc:
    """ROC of ``scores`` against the binary ``y_true`` (tied scores make one point); AUC by the trapezoid rule."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    if y.all() or not y.any():
        raise ValueError(f"an ROC needs both classes: {int(y.sum())} of {y.size} heads are in the reference circuit")
    thresholds = np.unique(s)[::-1]
    tp = np.array([np.sum(y & (s >= t)) for t in thresholds], dtype=float)
    fp = np.array([np.sum(~y & (s >= t)) for t in thresholds], dtype=float)
    tpr = np.concatenate([[0.0], tp / y.sum()])
    fpr = np.concatenate([[0.0], fp / (~y).sum()])
    return Roc(fpr, tpr, np.concatenate([[np.inf], thresholds]), float(np.trapezoid(tpr, fpr)))


class Operating(NamedTuple):
    """The point of an ROC the reference reports: the threshold of best ``F1 = 2 tpr (1 - fpr) / (tpr + 1 - fpr)``,
    and the ordinary precision and recall of the heads scored at or above it."""

    threshold: float
    f1: float
    precision: float
    recall: float


def operating_point(y_true: np.ndarray, scores: np.ndarray, curve: Roc) -> Operating:
    """The reference's best-F1 threshold on ``curve``, with precision and recall there."""
    tpr, spec = curve.tpr[1:], 1 - curve.fpr[1:]
    f1 = np.divide(2 * tpr * spec, tpr + spec, out=np.zeros_like(tpr), where=(tpr + spec) > 0)
    best = int(np.argmax(f1))
    threshold = float(curve.thresholds[1:][best])
    y, chosen = np.asarray(y_true).astype(bool), np.asarray(scores) >= threshold
    tp = float(np.sum(y & chosen))
    return Operating(threshold, float(f1[best]), tp / max(1, int(chosen.sum())), tp / max(1, int(y.sum())))


def top_pairs(pair_counts: np.ndarray, n: int = 20) -> list[tuple[int, int, float]]:
    """The ``n`` head pairs with the most unique co-occurrences: ``(h1, h2, count)``, best first."""
    flat = pair_counts.ravel()
    order = np.argsort(flat, kind="stable")[::-1][:n]
    size = pair_counts.shape[0]
    return [(int(i // size), int(i % size), float(flat[i])) for i in order if flat[i] > 0]
