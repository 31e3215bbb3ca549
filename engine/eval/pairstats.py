"""Activation correlation and co-firing of chosen latent pairs of two SAEs, accumulated over a token sample.

One pass: each batch's codes of both SAEs are gathered at the pairs' columns (in chunks of pairs, so memory is
``tokens x chunk``) and summed in float64; Pearson's correlation and the co-firing counts follow at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class PairResult(NamedTuple):
    """What ``PairStats`` measured."""

    corr: np.ndarray
    """``[P]`` Pearson correlation of the pair's activations over the sample's tokens (NaN if one never fires)."""
    n_both: np.ndarray
    """``[P]`` tokens where both latents fire."""
    fires_a: np.ndarray
    """``[d_a]`` tokens where each latent of A fires."""
    fires_b: np.ndarray
    """``[d_b]`` tokens where each latent of B fires."""
    n_tokens: int
    """Tokens in the sample."""


class PairStats:
    """Streaming sums for pairs ``(pairs_a[p], pairs_b[p])`` of latents of SAEs A and B (float64)."""

    def __init__(self, pairs_a: np.ndarray, pairs_b: np.ndarray, d_a: int, d_b: int, chunk: int = 8192):
        self.pa = torch.as_tensor(np.asarray(pairs_a, dtype=np.int64))
        self.pb = torch.as_tensor(np.asarray(pairs_b, dtype=np.int64))
        if self.pa.shape != self.pb.shape:
            raise ValueError("pairs_a and pairs_b must have the same length")
        self.chunk = chunk
        self.n = 0
        self.sum_ab = torch.zeros(len(self.pa), dtype=torch.float64)
        self.n_both = torch.zeros(len(self.pa), dtype=torch.int64)
        self.sum_a = torch.zeros(d_a, dtype=torch.float64)
        self.sum_a2 = torch.zeros(d_a, dtype=torch.float64)
        self.fires_a = torch.zeros(d_a, dtype=torch.int64)
        self.sum_b = torch.zeros(d_b, dtype=torch.float64)
        self.sum_b2 = torch.zeros(d_b, dtype=torch.float64)
        self.fires_b = torch.zeros(d_b, dtype=torch.int64)

    def update(self, codes_a: torch.Tensor, codes_b: torch.Tensor) -> None:
        """Add tokens: ``codes_a [n, d_a]``, ``codes_b [n, d_b]`` (the same tokens)."""
        a, b = codes_a.detach().float().cpu(), codes_b.detach().float().cpu()
        self.n += a.shape[0]
        for acc, s2, fires, c in ((self.sum_a, self.sum_a2, self.fires_a, a), (self.sum_b, self.sum_b2, self.fires_b, b)):
            acc += c.sum(0, dtype=torch.float64)
            s2 += c.double().pow(2).sum(0)
            fires += (c > 0).sum(0)
        for start in range(0, len(self.pa), self.chunk):
            ga, gb = a[:, self.pa[start : start + self.chunk]], b[:, self.pb[start : start + self.chunk]]
            self.sum_ab[start : start + self.chunk] += (ga.double() * gb.double()).sum(0)
            self.n_both[start : start + self.chunk] += ((ga > 0) & (gb > 0)).sum(0)

    def result(self) -> PairResult:
        n = max(self.n, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        var_a = (self.sum_a2 / n - mean_a.pow(2)).clamp_min(0)
        var_b = (self.sum_b2 / n - mean_b.pow(2)).clamp_min(0)
        cov = self.sum_ab / n - mean_a[self.pa] * mean_b[self.pb]
        denom = (var_a[self.pa] * var_b[self.pb]).sqrt()
        corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.full_like(cov, float("nan")))
        return PairResult(corr.clamp(-1, 1).numpy(), self.n_both.numpy(), self.fires_a.numpy(), self.fires_b.numpy(), self.n)
