"""Nearest neighbours among the rows of one matrix of unit vectors (a decoder's directions), all rows at once:
exact (every pair) or through an inverted-file (IVF) index, plus the recall of the second against the first.

The IVF search groups the rows into spherical k-means lists; each row probes the ``n_probe`` lists whose centroids
are nearest it (FAISS's ``nprobe``). The work is batched by probed list: one dense product of a list's rows against
the rows that probe it, merged into each row's running best ``n``. It compares about ``n_probe / n_lists`` of all
pairs; ``recall_at_n`` measures what that costs in recall (low where the rows are near-orthogonal, as trained SAE
decoders mostly are: see docs/scaling.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Neighbors(NamedTuple):
    """Per row the ids ``[rows, n]`` (int32) and cosines (float32) of its ``n`` nearest other rows, best first, and
    the share of all row pairs whose cosine was computed (1.0 for an exact search: the cost next to it)."""

    ids: np.ndarray
    cos: np.ndarray
    compared: float = 1.0


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
    (default ``default_lists``) trained on ``train_rows`` rows per list; each row probes ``n_probe`` lists. A row
    whose probed lists hold fewer than ``n`` other rows is searched exactly. With ``n_probe >= n_lists`` the result
    is exact."""
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
    probes = torch.cat([(block @ centroids.T).topk(n_probe, dim=1).indices for block in dirs.split(16384)])
    flat = probes.flatten()
    by_list = torch.argsort(flat, stable=True)
    asking = torch.arange(N, device=dirs.device).repeat_interleave(n_probe)[by_list]  # rows, grouped by probed list
    ask_starts = np.concatenate([[0], np.cumsum(torch.bincount(flat, minlength=n_lists).tolist())]).tolist()
    best_cos = torch.full((N, n), -float("inf"), device=dirs.device)
    best_ids = torch.full((N, n), -1, dtype=torch.long, device=dirs.device)
    compared = 0
    for c in range(n_lists):
        rows, queries = members[c], asking[ask_starts[c] : ask_starts[c + 1]]
        if not len(rows) or not len(queries):
            continue
        sims = dirs[queries] @ dirs[rows].T
        sims[queries[:, None] == rows[None, :]] = -float("inf")
        compared += sims.numel()
        top = sims.topk(min(n, len(rows)), dim=1)
        merged_cos = torch.cat([best_cos[queries], top.values.float()], dim=1)
        merged_ids = torch.cat([best_ids[queries], rows[top.indices]], dim=1)
        keep = merged_cos.topk(n, dim=1)
        best_cos[queries], best_ids[queries] = keep.values, merged_ids.gather(1, keep.indices)
    short = torch.isinf(best_cos).any(dim=1).nonzero(as_tuple=True)[0]
    if len(short):  # probed lists held fewer than n other rows: search these rows exactly
        found = exact_rows(dirs, short, n)
        best_ids[short] = torch.as_tensor(found.ids, dtype=torch.long, device=dirs.device)
        best_cos[short] = torch.as_tensor(found.cos, device=dirs.device)
        compared += len(short) * N
    ids, cos = best_ids.cpu().numpy().astype(np.int32), best_cos.cpu().numpy()
    return Neighbors(ids, cos, compared / N**2)


def recall_at_n(dirs: torch.Tensor, approx_ids: np.ndarray, sample: int = 512, seed: int = 0) -> Recall:
    """Recall@n of ``approx_ids [N, n]`` against the exact ``n`` nearest, on ``sample`` rows drawn with ``seed``
    (all rows when ``sample >= N``)."""
    N, n = approx_ids.shape
    rows = np.arange(N) if sample >= N else np.sort(np.random.default_rng(seed).choice(N, sample, replace=False))
    exact = exact_rows(dirs, torch.as_tensor(rows, device=dirs.device), n).ids
    found = [len(np.intersect1d(a, e)) for a, e in zip(approx_ids[rows], exact, strict=True)]
    return Recall(float(np.mean(found)) / n, rows)
