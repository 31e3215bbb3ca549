"""SAEBench's "core" extras that a run's manifest does not hold, streamed over a token sample.

- L2 ratio: mean over tokens of ``||x_hat|| / ||x||`` (below 1: shrinkage); a token with ``||x|| < 1e-4`` counts
  its ``||x_hat||``, as SAEBench's core eval does.
- Relative reconstruction bias (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs",
  eq. 10): ``gamma = E[||x_hat||^2] / E[x . x_hat]``, the factor ``argmin_g E||x_hat / g - x||^2``; below 1:
  the SAE shrinks. Computed over the whole sample (SAEBench averages per-batch ratios).
- Cosine: mean over tokens of ``cos(x, x_hat)``.
- Firing fractions: the fraction of latents whose density (fraction of the run's statistic tokens where they
  fire) is above 1% and above 10% (SAEBench's ``freq_over_1_percent`` / ``freq_over_10_percent``).
"""

from __future__ import annotations

import numpy as np
import torch


class CoreStats:
    """Streaming sums for the L2 ratio, relative reconstruction bias and cosine (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_ratio = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add tokens ``x, x_hat [n, d]``."""
        x, x_hat = x.double(), x_hat.double()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += x.shape[0]
        self.sum_ratio += float((norm_out / torch.where(norm_in < 1e-4, torch.ones_like(norm_in), norm_in)).sum())
        self.sum_xhat_sq += float(norm_out.pow(2).sum())
        dot = (x * x_hat).sum(-1)
        self.sum_dot += float(dot.sum())
        self.sum_cos += float((dot / (norm_in * norm_out).clamp_min(1e-12)).sum())

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": self.sum_xhat_sq / self.sum_dot if self.sum_dot else float("nan"),
            "cosine": self.sum_cos / n,
        }


def firing_fractions(densities: np.ndarray) -> dict[str, float]:
    """Fractions of latents firing on more than 1% and 10% of tokens, and of latents alive."""
    d = np.asarray(densities, dtype=np.float64)
    return {"frac_over_1pct": float((d > 0.01).mean()), "frac_over_10pct": float((d > 0.1).mean()),
            "frac_alive": float((d > 0).mean())}
