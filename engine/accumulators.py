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

import numpy as np
import torch


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


class FeatureStats:
    """Fire counts, activation sums, maxima and histograms of ``d_sae`` latents over included tokens."""

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

    def update(self, codes: torch.Tensor, n_included: int) -> torch.Tensor:
        """Add ``codes [n, d_sae]`` (zero at excluded tokens); returns each token's L0 ``[n]``."""
        codes = codes.float()
        rows, cols = (codes > 0).nonzero(as_tuple=True)
        vals = codes[rows, cols]
        d_sae = self.fire_count.shape[0]
        self.n_tokens += int(n_included)
        self.fire_count += torch.bincount(cols, minlength=d_sae)
        self.act_sum.index_add_(0, cols, vals.double())
        self.max_act = torch.maximum(self.max_act, codes.amax(0) if len(codes) else self.max_act)
        self._grow(self.max_act)
        width = self.hi[cols] / self.n_bins
        bins = (vals / width).long().clamp_(max=self.n_bins - 1)  # clamp only guards float edge cases
        flat = cols * self.n_bins + bins
        self.hist.view(-1).add_(torch.bincount(flat, minlength=d_sae * self.n_bins))
        return torch.bincount(rows, minlength=codes.shape[0])

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

    def summary(self) -> FeatureSummary:
        """Counts, density (over included tokens), max, mean over firing tokens, trimmed histograms."""
        fire = self.fire_count.cpu().numpy()
        n = max(self.n_tokens, 1)
        mean = np.where(fire > 0, self.act_sum.cpu().numpy() / np.maximum(fire, 1), 0.0)
        hist = self.hist.cpu().numpy()
        hi = self.hi.cpu().numpy()
        counts, edges = [], []
        for row, top in zip(hist, hi):  # once at the end, not per batch
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
        )
