"""Feature-choice SAE (Ayonrinde 2024): in a batch of N tokens each latent picks its top-m tokens (m = k*N/d_sae).

That rule depends on the batch, so one token is encoded by per-latent thresholds estimated on training batches
(tensor ``threshold``, as SAELens saves BatchTopK as JumpReLU): a latent fires where its pre-activation exceeds its
threshold. ``feature_choice_codes`` is the batch rule itself (training, tests).
"""

from __future__ import annotations

import torch

from .base import register
from .jumprelu import JumpReLUSAE


def feature_capacity(k: int, n_tokens: int, d_sae: int) -> int:
    """Tokens each latent may pick in a batch of ``n_tokens``: ``floor(k * N / d_sae)``, at least 1 and at most N."""
    return min(n_tokens, max(1, k * n_tokens // d_sae))


def feature_choice_codes(pre: torch.Tensor, m: int) -> torch.Tensor:
    """Batch rule on ``pre [N, d_sae]``: each latent keeps its ``m`` largest (ReLU'd) values over the N tokens."""
    values, rows = pre.relu().topk(m, dim=0, sorted=False)
    return torch.zeros_like(pre).scatter_(0, rows, values)


def feature_choice_thresholds(pre: torch.Tensor, m: int) -> torch.Tensor:
    """``[d_sae]`` thresholds that give the batch rule's codes on this batch: each latent's midpoint between its
    m-th and (m+1)-th largest pre-activation (never below 0: codes are ReLU'd)."""
    if m >= pre.shape[0]:
        return torch.zeros(pre.shape[1], dtype=pre.dtype, device=pre.device)
    top = pre.topk(m + 1, dim=0).values
    return ((top[m - 1] + top[m]) / 2).clamp_min(0)


@register
class FeatureChoiceSAE(JumpReLUSAE):
    """At inference a JumpReLU SAE (per-latent thresholds estimated on training batches); ``batch_codes`` is the
    training rule."""

    architecture = "feature_choice"
    missing_hint = ("a feature_choice SAE needs its per-latent inference thresholds (tensor 'threshold', estimated on "
                    "training batches); this file was saved without them")

    def batch_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The training rule on a batch ``x [N, d_in]``: each latent's top-m tokens, m = ``feature_capacity``."""
        sae_in, _, _ = self.process_in(x)
        pre = sae_in @ self.W_enc + self.b_enc
        k = self.cfg.k
        assert k is not None  # SAEConfig refuses a feature_choice config without k
        return feature_choice_codes(pre, feature_capacity(k, pre.shape[0], self.cfg.d_sae))
