"""Gradient TopK SAE (g-SAE, Olmo et al. 2025): TopK selection over ``z + beta * z * |W_dec grad_x L|``.

``z`` is the pre-activation and ``grad_x L`` the gradient of the next-token loss with respect to the hooked
activation, so a latent whose decoder direction matters to the loss is admitted even when ``z`` is small. The kept
values are ``relu(z)``: the gradient decides only which latents fire. Where no gradient is given (the last position
of a context, generated tokens, any caller without a backward pass) the rule falls back to plain TopK over ``z``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import register
from .topk import TopKSAE


def gradient_scores(pre: torch.Tensor, grad: torch.Tensor, W_dec: torch.Tensor, beta: float) -> torch.Tensor:
    """``z + beta * z * |W_dec grad|`` for pre-activations ``pre [..., d_sae]`` and gradients ``grad [..., d_in]``."""
    influence = (grad.to(W_dec.dtype) @ W_dec.T).abs()
    return pre + beta * pre * influence


@register
class GradientTopKSAE(TopKSAE):
    architecture = "gradient_topk"
    needs_loss_gradient = True

    def _select_with(self, sae_in: torch.Tensor, grad: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if grad is None:
            return self._select(sae_in)
        if grad.shape != sae_in.shape:
            raise ValueError(f"the loss gradient has shape {tuple(grad.shape)}; the SAE input has {tuple(sae_in.shape)}")
        pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        score = gradient_scores(pre, grad, self.W_dec, self.cfg.gradient_beta)
        indices = score.topk(self.k, dim=-1, sorted=False).indices
        return pre, pre.gather(-1, indices).relu(), indices

    def encode(self, x: torch.Tensor, *, grad: torch.Tensor | None = None) -> torch.Tensor:
        """Codes; ``grad [..., d_in]`` is the next-token loss gradient at the hook (None: plain TopK over ``z``)."""
        sae_in, _, _ = self.process_in(x)
        return self._encode(sae_in, grad=grad)

    def _encode(self, sae_in: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        pre, values, indices = self._select_with(sae_in, grad)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def admitted_by_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae]`` bool: latents that fire with the gradient term but would not under plain TopK over ``z``."""
        sae_in, _, _ = self.process_in(x)
        with_grad = self._encode(sae_in, grad=grad) > 0
        plain = self._encode(sae_in) > 0
        return with_grad & ~plain

    def _encode_decode(self, sae_in: torch.Tensor, **encode_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = set(encode_kwargs) - {"grad"}
        if unknown:
            raise TypeError(f"a g-SAE's encoder takes only grad, got {', '.join(sorted(unknown))}")
        return self._codes_and_recon(*self._select_with(sae_in, encode_kwargs.get("grad")))
