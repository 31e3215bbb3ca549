"""Streaming per-latent statistics on the device: fire counts, sums, maxima and exact histograms.

Histograms cover ``[0, hi)`` per latent, where ``hi`` is the smallest power of two strictly above
the latent's running maximum. When a batch raises the maximum past ``hi``, the range doubles
(possibly several times) and adjacent pairs of bins merge: with power-of-two ranges and a
power-of-two bin count every bin edge is exactly representable and ``floor(a / width)`` is exact,
so merged counts equal what binning every activation on the final range would give. At the end
bins above the one holding the maximum are trimmed, so the histogram spans ``[0, >= max_act]``
with between half and all of ``n_bins`` bins. Everything is vectorised over latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class SparseCodes(NamedTuple):
    """The positive codes of a batch at statistic tokens, as (token, latent, value) triplets."""

    token: torch.Tensor
    """``[nnz]`` flat token index into the batch's ``[n, d_sae]`` codes."""
    latent: torch.Tensor
    value: torch.Tensor
    """``[nnz]`` float32."""


def sparse_codes(codes: torch.Tensor, mask: torch.Tensor) -> SparseCodes:
    """Positive entries of ``codes [n, d_sae]`` at tokens where ``mask [n]`` is true (one pass over the codes)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[codes.element_size()]
    token, latent = codes.view(bits).nonzero(as_tuple=True)  # integer view: about twice as fast as codes > 0
    value = codes[token, latent].float()
    keep = mask[token] & (value > 0)
    return SparseCodes(token[keep], latent[keep], value[keep])


def pow2_above(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two strictly greater than each (positive) element; 0 where ``x <= 0``."""
    _, exponent = torch.frexp(x.float())  # x = m * 2**e with m in [0.5, 1): 2**e > x >= 2**(e-1)
    hi = torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent)
    return torch.where(x > 0, hi, torch.zeros_like(hi))


@dataclass(frozen=True)
class FeatureSummary:
    """Final per-latent statistics as numpy arrays (one row per latent)."""

    fire_count: np.ndarray
    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    hist_counts: list[np.ndarray]
    hist_edges: list[np.ndarray]
    n_tokens: int
    gradient_only_count: np.ndarray | None = None
    """g-SAE runs: each latent's firings admitted by the gradient alone (None for other SAEs)."""


class FeatureStats:
    """Fire counts, activation sums, maxima and histograms of ``d_sae`` latents over included tokens; for a g-SAE
    also the firings the gradient alone admitted (``add_gradient_only``)."""

    grad_only: torch.Tensor | None = None
    """``[d_sae]`` int64 once ``add_gradient_only`` is called (a g-SAE's pass), else None (also in states saved
    before it existed)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu", n_bins: int = 64):
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.n_tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hi = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.int64, device=device)

    def update(self, codes: SparseCodes, n_rows: int, n_included: int) -> torch.Tensor:
        """Add a batch's firing codes (``n_included`` statistic tokens); returns the L0 of each of ``n_rows`` tokens."""
        d_sae = self.fire_count.shape[0]
        self.n_tokens += int(n_included)
        self.fire_count += torch.bincount(codes.latent, minlength=d_sae)
        self.act_sum.index_add_(0, codes.latent, codes.value.double())
        batch_max = torch.zeros_like(self.max_act).scatter_reduce_(0, codes.latent, codes.value, "amax")
        self.max_act = torch.maximum(self.max_act, batch_max)
        self._grow(self.max_act)
        width = self.hi[codes.latent] / self.n_bins
        bins = (codes.value / width).long().clamp_(max=self.n_bins - 1)  # clamp only guards float edge cases
        flat = codes.latent * self.n_bins + bins
        self.hist.view(-1).add_(torch.bincount(flat, minlength=d_sae * self.n_bins))
        return torch.bincount(codes.token, minlength=n_rows)

    def add_gradient_only(self, latents: torch.Tensor) -> None:
        """Count one firing admitted by the gradient alone for each entry of ``latents`` (latent ids)."""
        counts = torch.bincount(latents, minlength=self.fire_count.shape[0]).to(self.fire_count.device)
        self.grad_only = counts if self.grad_only is None else self.grad_only + counts

    def _grow(self, new_max: torch.Tensor) -> None:
        """Double the histogram range of latents whose maximum reached ``hi``, merging bin pairs."""
        grow = new_max >= self.hi
        if not bool(grow.any()):
            return
        idx = grow.nonzero(as_tuple=True)[0]
        old_hi, new_hi = self.hi[idx], pow2_above(new_max[idx])
        fresh = old_hi == 0
        shift = (torch.log2(new_hi) - torch.log2(old_hi.clamp_min(1e-38))).round().long()
        shift = torch.where(fresh, torch.zeros_like(shift), shift).clamp_(max=62)
        target = torch.arange(self.n_bins, device=idx.device)[None, :] >> shift[:, None]
        merged = torch.zeros_like(self.hist[idx]).scatter_add_(1, target, self.hist[idx])
        self.hist[idx] = merged
        self.hi[idx] = new_hi

    def merge(self, other: FeatureStats) -> None:
        """Add another state over disjoint tokens (it is consumed): both histograms move to the merged range
        (power-of-two doubling, so exactly) and add; counts and sums add; maxima take the larger."""
        other = other.to(self.fire_count.device)
        self.n_tokens += other.n_tokens
        self.fire_count += other.fire_count
        self.act_sum += other.act_sum
        self.max_act = torch.maximum(self.max_act, other.max_act)
        self._grow(self.max_act)
        other._grow(self.max_act)
        self.hist += other.hist
        if other.grad_only is not None:
            mine = torch.zeros_like(other.grad_only) if self.grad_only is None else self.grad_only
            self.grad_only = mine + other.grad_only

    def to(self, device: torch.device | str) -> FeatureStats:
        """This state with its tensors on ``device`` (in place)."""
        for name in ("fire_count", "act_sum", "max_act", "hi", "hist"):
            setattr(self, name, getattr(self, name).to(device))
        if self.grad_only is not None:
            self.grad_only = self.grad_only.to(device)
        return self

    @classmethod
    def concat(cls, parts: list[FeatureStats]) -> FeatureStats:
        """One state over the latents of ``parts`` (slices of the latents, in order, over the same tokens)."""
        out = cls(0, parts[0].fire_count.device, n_bins=parts[0].n_bins)
        out.n_tokens = parts[0].n_tokens
        for name in ("fire_count", "act_sum", "max_act", "hi", "hist"):
            setattr(out, name, torch.cat([getattr(p, name).to(out.fire_count.device) for p in parts]))
        if any(p.grad_only is not None for p in parts):
            out.grad_only = torch.cat([torch.zeros_like(p.fire_count) if p.grad_only is None else p.grad_only
                                       for p in parts]).to(out.fire_count.device)
        return out

    def summary(self) -> FeatureSummary:
        """Counts, density (over included tokens), max, mean over firing tokens, trimmed histograms."""
        fire = self.fire_count.cpu().numpy()
        n = max(self.n_tokens, 1)
        mean = np.where(fire > 0, self.act_sum.cpu().numpy() / np.maximum(fire, 1), 0.0)
        hist = self.hist.cpu().numpy()
        hi = self.hi.cpu().numpy()
        counts, edges = [], []
        for row, top in zip(hist, hi, strict=True):  # once at the end, not per batch
            if top == 0:
                counts.append(np.zeros(0, np.int64))
                edges.append(np.zeros(0, np.float32))
                continue
            used = int(np.nonzero(row)[0].max()) + 1
            counts.append(row[:used])
            edges.append((np.arange(used + 1, dtype=np.float64) * (top / self.n_bins)).astype(np.float32))
        return FeatureSummary(
            fire_count=fire,
            density=fire / n,
            max_act=self.max_act.cpu().numpy(),
            mean_act=mean.astype(np.float32),
            hist_counts=counts,
            hist_edges=edges,
            n_tokens=self.n_tokens,
            gradient_only_count=None if self.grad_only is None else self.grad_only.cpu().numpy(),
        )
