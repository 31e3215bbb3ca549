"""Nearest neighbours among the rows of one matrix of unit vectors (a decoder's directions), all rows at once:
exact (every pair) or through an inverted-file (IVF) index, plus the recall of the second against the first.

The IVF search groups the rows into spherical k-means lists and searches each list's members against the members
of the ``n_probe`` lists whose centroids are nearest the list's own centroid (the list itself first), so the work is
one dense product per list. The query-side grouping (one probe set per list, not per row) keeps it batched; its cost
in recall is what ``recall_at_n`` measures.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Neighbors(NamedTuple):
    """Per row the ids ``[rows, n]`` (int32) and cosines (float32) of its ``n`` nearest other rows, best first."""

    ids: np.ndarray
    cos: np.ndarray


class Recall(NamedTuple):
    """Mean over ``rows`` of the share of each row's exact ``n`` nearest that an approximate search found."""

    value: float
    rows: np.ndarray


def exact_rows(dirs: torch.Tensor, rows: torch.Tensor, n: int, chunk: int = 1024) -> Neighbors:
    """The exact ``n`` nearest other rows of ``dirs [N, d]`` (unit rows) for each of ``rows``."""
    ids, cos = [], []
    for block in rows.split(chunk):
        sims = dirs[block] @ dirs.T
        sims[torch.arange(len(block), device=sims.device), block] = -float("inf")  # not its own neighbour
        top = sims.topk(n, dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.float().cpu())
    return Neighbors(torch.cat(ids).numpy().astype(np.int32), torch.cat(cos).numpy())


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    return torch.cat([(block @ centroids.T).argmax(dim=1) for block in x.split(chunk)])


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 8, seed: int = 0) -> torch.Tensor:
    """``[k, d]`` unit centroids of the unit rows of ``x``: Lloyd steps on the cosine, empty lists reseeded."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    centroids = x[torch.randperm(len(x), generator=gen)[:k].sort().values.to(x.device)].clone()
    for _ in range(iters):
        assign = _assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        if bool(empty.any()):
            sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=gen).to(x.device)]
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return centroids


def default_lists(n_rows: int) -> int:
    """``2 sqrt(N)`` lists (1,024 at 262k rows, 2,048 at 1M): lists of ~sqrt(N)/2 rows."""
    return max(1, round(2 * math.sqrt(n_rows)))


def ivf_neighbors(dirs: torch.Tensor, n: int, *, n_lists: int | None = None, n_probe: int = 32, train_rows: int = 64,
                  seed: int = 0) -> Neighbors:
    """Approximate ``n`` nearest other rows of ``dirs [N, d]`` (unit rows) for every row, through ``n_lists`` IVF lists
    (default ``default_lists``) trained on ``train_rows`` rows per list; each list probes ``n_probe`` lists. A list
    whose probed lists hold too few rows is searched exactly. With ``n_probe >= n_lists`` the result is exact."""
    N = len(dirs)
    n_lists = min(n_lists or default_lists(N), N)
    n_probe = min(n_probe, n_lists)
    gen = torch.Generator().manual_seed(seed)
    train = dirs[torch.randperm(N, generator=gen)[: train_rows * n_lists].to(dirs.device)]
    centroids = spherical_kmeans(train, n_lists, seed=seed)
    assign = _assign(dirs, centroids)
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=n_lists).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    members = [order[starts[c] : starts[c + 1]] for c in range(n_lists)]
    probes = (centroids @ centroids.T).topk(n_probe, dim=1).indices.tolist()
    ids = np.zeros((N, n), np.int32)
    cos = np.zeros((N, n), np.float32)
    for c in range(n_lists):
        rows = members[c]
        if not len(rows):
            continue
        cand = torch.cat([members[p] for p in probes[c]])
        if len(cand) <= n:  # too few to fill n neighbours: search these rows exactly
            found = exact_rows(dirs, rows, n)
        else:
            sims = dirs[rows] @ dirs[cand].T
            sims[rows[:, None] == cand[None, :]] = -float("inf")
            top = sims.topk(n, dim=1)
            found = Neighbors(cand[top.indices].cpu().numpy().astype(np.int32), top.values.float().cpu().numpy())
        where = rows.cpu().numpy()
        ids[where], cos[where] = found.ids, found.cos
    return Neighbors(ids, cos)


def recall_at_n(dirs: torch.Tensor, approx_ids: np.ndarray, sample: int = 512, seed: int = 0) -> Recall:
    """Recall@n of ``approx_ids [N, n]`` against the exact ``n`` nearest, on ``sample`` rows drawn with ``seed``
    (all rows when ``sample >= N``)."""
    N, n = approx_ids.shape
    rows = np.arange(N) if sample >= N else np.sort(np.random.default_rng(seed).choice(N, sample, replace=False))
    exact = exact_rows(dirs, torch.as_tensor(rows, device=dirs.device), n).ids
    found = [len(np.intersect1d(a, e)) for a, e in zip(approx_ids[rows], exact, strict=True)]
    return Recall(float(np.mean(found)) / n, rows)
