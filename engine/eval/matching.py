"""Matching the latents of two SAEs by the cosine similarity of their decoder rows.

``top_matches`` keeps, for every latent of A, its ``m`` most similar latents of B (one chunked matmul); that
sparsified similarity is all the one-to-one assignment sees. ``one_to_one`` solves the assignment exactly with
SciPy's ``linear_sum_assignment`` on the sparsified matrix (entries outside the top ``m`` are 0, i.e. "no
match") while the dense matrix has at most ``DENSE_LIMIT`` cells, and greedily above (pairs taken by descending
cosine while both latents are free), which keeps memory and time linear in ``d_sae``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

DENSE_LIMIT = 1 << 24
"""Most cells (``n_a * n_b``) of the dense sparsified matrix ``linear_sum_assignment`` is given (128 MiB of
float64); larger problems are assigned greedily. 1,152 x 4,608 (5.3 M) is exact; 4,608 x 18,432 (85 M) greedy."""


class TopMatches(NamedTuple):
    """For each latent of A its ``m`` most similar latents of B by decoder cosine, best first."""

    ids: np.ndarray
    """``[n_a, m]`` int64 latent ids of B."""
    cos: np.ndarray
    """``[n_a, m]`` float32 cosine similarities."""


class Assignment(NamedTuple):
    """A one-to-one matching of A's latents to B's."""

    partner: np.ndarray
    """``[n_a]`` int64: the latent of B assigned to each latent of A, -1 where none (no candidate left)."""
    cos: np.ndarray
    """``[n_a]`` float32: its decoder cosine (NaN where unmatched)."""
    method: str
    """``"lsa"`` (exact on the sparsified similarity) or ``"greedy"``."""


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (float32; an all-zero row stays zero)."""
    w = w.detach().float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def top_matches(w_a: torch.Tensor, w_b: torch.Tensor, m: int = 16, chunk: int = 2048) -> TopMatches:
    """The ``m`` B rows most cosine-similar to each A row (``w_a [n_a, d]``, ``w_b [n_b, d]``: decoder rows)."""
    if w_a.shape[-1] != w_b.shape[-1]:
        raise ValueError(f"decoders of different widths: {w_a.shape[-1]} vs {w_b.shape[-1]}")
    a, b = unit_rows(w_a), unit_rows(w_b).to(w_a.device)
    m = min(m, b.shape[0])
    ids, cos = [], []
    for start in range(0, a.shape[0], chunk):
        values, index = (a[start : start + chunk] @ b.T).topk(m, dim=-1)
        ids.append(index.cpu())
        cos.append(values.cpu())
    return TopMatches(torch.cat(ids).numpy().astype(np.int64), torch.cat(cos).numpy().astype(np.float32))


def one_to_one(top: TopMatches, n_b: int, *, min_cos: float = 0.0, method: str = "auto") -> Assignment:
    """A one-to-one assignment maximising the summed cosine over the candidate pairs of ``top`` with cosine
    ``> min_cos``. ``method``: ``"lsa"``, ``"greedy"`` or ``"auto"`` (lsa up to ``DENSE_LIMIT`` cells)."""
    n_a = top.ids.shape[0]
    if method == "auto":
        method = "lsa" if n_a * n_b <= DENSE_LIMIT else "greedy"
    if method not in ("lsa", "greedy"):
        raise ValueError(f"method must be 'auto', 'lsa' or 'greedy', got {method!r}")
    rows = np.repeat(np.arange(n_a), top.ids.shape[1])
    cols, sims = top.ids.reshape(-1), top.cos.reshape(-1).astype(np.float64)
    keep = sims > min_cos
    rows, cols, sims = rows[keep], cols[keep], sims[keep]
    partner = np.full(n_a, -1, dtype=np.int64)
    if method == "lsa":
        from scipy.optimize import linear_sum_assignment

        dense = np.zeros((n_a, n_b))
        dense[rows, cols] = sims
        r, c = linear_sum_assignment(dense, maximize=True)
        real = dense[r, c] > 0  # a pair the sparsified matrix has no entry for is "unmatched"
        partner[r[real]] = c[real]
    else:
        order = np.lexsort((rows, -sims))  # by descending cosine, ties by A's id: deterministic
        taken = np.zeros(n_b, dtype=bool)
        for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
            if partner[i] < 0 and not taken[j]:
                partner[i] = j
                taken[j] = True
    hit = top.ids == partner[:, None]  # the partner's place among each row's candidates (none where -1)
    cos = np.where(partner >= 0, np.where(hit, top.cos, 0).sum(1), np.nan).astype(np.float32)
    return Assignment(partner, cos, method)
