"""Mutual-choice SAE (Ayonrinde 2024): a batch of N tokens spends a budget of k*N over its whole token x latent
matrix (the k*N largest ReLU'd pre-activations fire; BatchTopK's rule).

That rule depends on the batch, so one token is encoded by one global threshold estimated on training batches
(``cfg.global_threshold``): a latent fires where its pre-activation exceeds it. ``mutual_choice_codes`` is the batch
rule itself (training, tests, Matryoshka BatchTopK training).
"""

from __future__ import annotations

import torch

from .base import SAE, register


def mutual_choice_codes(pre: torch.Tensor, budget: int) -> torch.Tensor:
    """Batch rule on ``pre [N, d_sae]``: the ``budget`` largest ReLU'd values of the whole matrix, zeros elsewhere."""
    flat = pre.relu().flatten()
    values, idx = flat.topk(min(budget, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, values).reshape(pre.shape)


def mutual_choice_threshold(pre: torch.Tensor, budget: int) -> float:
    """The global threshold that gives the batch rule's codes on this batch: the midpoint between the matrix's
    budget-th and (budget+1)-th largest pre-activation (never below 0)."""
    flat = pre.flatten()
    if budget >= flat.numel():
        return 0.0
    top = flat.topk(budget + 1).values
    return max(0.0, float((top[budget - 1] + top[budget]) / 2))


@register
class MutualChoiceSAE(SAE):
    architecture = "mutual_choice"

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        pre = sae_in @ self.W_enc + self.b_enc
        threshold = self.cfg.global_threshold
        assert threshold is not None  # SAEConfig refuses a mutual_choice config without one
        return torch.relu(pre) * (pre > threshold).to(pre.dtype)

    def batch_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The training rule on a batch ``x [N, d_in]``: the k*N largest values of the batch's codes."""
        sae_in, _, _ = self.process_in(x)
        pre = sae_in @ self.W_enc + self.b_enc
        k = self.cfg.k
        assert k is not None  # SAEConfig refuses a mutual_choice config without k
        return mutual_choice_codes(pre, k * pre.shape[0])
