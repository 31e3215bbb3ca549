"""Feature splitting: a latent of the narrower SAE and the latents of the wider one that split it.

A latent ``j`` of the wide SAE is a *child* of latent ``i`` of the narrow one when their decoder rows are close
(cosine ``>= split_cos``) **and** ``j`` fires where ``i`` does: of the sample tokens where ``j`` fires, at least
``cofire`` have ``i`` firing too (``P(i | j)``), over at least ``min_fires`` firings of ``j``. ``i`` is *split*
when it has two children or more (one child is a match, not a split). Cosine alone would also pair a latent with
an unrelated near-duplicate direction; co-firing alone would pair it with any dense latent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .matching import TopMatches


class SplitCriteria(NamedTuple):
    split_cos: float = 0.5
    """Minimum decoder cosine between parent and child."""
    cofire: float = 0.5
    """Minimum fraction of the child's firing tokens where the parent fires too."""
    min_fires: int = 5
    """Minimum firings of the child in the sample (fewer: too little evidence)."""


def candidates(top: TopMatches, split_cos: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a_ids, b_ids, cos)`` of the top-match pairs with cosine ``>= split_cos``, by A's id then cosine."""
    keep = top.cos >= split_cos
    a_ids = np.nonzero(keep)[0].astype(np.int64)
    return a_ids, top.ids[keep].astype(np.int64), top.cos[keep].astype(np.float32)


def children(n_both: np.ndarray, fires_parent: np.ndarray, fires_child: np.ndarray, crit: SplitCriteria) -> np.ndarray:
    """Which candidate pairs (cosine already ``>= split_cos``) are parent-child: a boolean mask."""
    fires_child = np.asarray(fires_child)
    p_parent = np.divide(n_both, fires_child, out=np.zeros(len(n_both)), where=fires_child > 0)
    return (fires_child >= crit.min_fires) & (p_parent >= crit.cofire) & (np.asarray(fires_parent) > 0)


def split_parents(a_ids: np.ndarray, child: np.ndarray) -> dict[int, int]:
    """Parent id -> number of children, for the parents with two children or more."""
    ids, counts = np.unique(a_ids[child], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True) if c >= 2}
