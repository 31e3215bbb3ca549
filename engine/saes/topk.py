"""TopK SAE: keep the k largest pre-activations per token (ReLU'd)."""

from typing import Any

import torch
import torch.nn.functional as F

from .base import SAE, EncoderAffine, register

BLOCK = 64
"""Latents per block of ``wide_topk``'s first pass."""


def wide_topk(x: torch.Tensor, k: int, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1, sorted=False)`` in two short passes where the last dimension is wide: each block of
    ``block`` latents' maximum, the ``k`` blocks with the largest maxima, then the top ``k`` of their ``k * block``
    values. Exact: an element outside those blocks is at most the smallest of their ``k`` maxima, so at least ``k``
    elements are as large as it (it can only tie with the k-th). The values are ``torch.topk``'s; where values tie
    at the k-th, which of the tied indices is kept may differ (torch.topk's choice is unspecified too). At 262,144
    latents this reads every value once instead of partially sorting each row."""
    n = x.shape[-1]
    if n % block or n < 16 * k * block:  # narrow: one topk is as cheap
        return x.topk(k, dim=-1, sorted=False)
    lead = x.shape[:-1]
    blocks = x.reshape(-1, n // block, block)
    _, chosen = blocks.amax(-1).topk(k, dim=-1, sorted=False)  # [R, k] blocks
    cand = blocks.gather(1, chosen[..., None].expand(-1, -1, block)).reshape(len(blocks), k * block)
    values, at = cand.topk(k, dim=-1, sorted=False)
    indices = chosen.gather(1, at // block) * block + at % block
    return values.reshape(*lead, k), indices.reshape(*lead, k)


@register
class TopKSAE(SAE):
    architecture = "topk"

    @property
    def k(self) -> int:
        """Latents kept per token (``SAEConfig`` refuses a topk config without one)."""
        k = self.cfg.k
        assert k is not None
        return k

    def _select(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-activations and the k kept (values, indices) per token."""
        pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = wide_topk(pre, self.k)
        return pre, values.relu(), indices

    def encoder_affine(self) -> EncoderAffine:
        """What TopK selects on and keeps: ``pre``, times ``||W_dec||`` when ``rescale_acts_by_decoder_norm``."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            return EncoderAffine(self.W_enc, self.b_enc)
        norms = self.W_dec.norm(dim=-1)
        return EncoderAffine(self.W_enc * norms, self.b_enc * norms)

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        pre, values, indices = self._select(sae_in)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            codes = codes / self.W_dec.norm(dim=-1)
        return codes @ self.W_dec + self.b_dec

    def _encode_decode(self, sae_in: torch.Tensor, **encode_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if encode_kwargs:  # TopK's encoder takes no options (as the base class's _encode would refuse them)
            raise TypeError(f"a TopK SAE's encoder takes no options, got {', '.join(sorted(encode_kwargs))}")
        return self._codes_and_recon(*self._select(sae_in))

    def _codes_and_recon(self, pre: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense codes and the reconstruction from the k kept latents (values, indices) per token: decoded from
        the k kept rows only, ~k/d_sae of the dense matmul's work."""
        codes = torch.zeros_like(pre).scatter_(-1, indices, values)
        weights = values
        if self.cfg.rescale_acts_by_decoder_norm:
            weights = weights / self.W_dec.norm(dim=-1)[indices]
        flat_idx, flat_w = indices.reshape(-1, self.k), weights.reshape(-1, self.k).to(self.W_dec.dtype)
        recon = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_w, mode="sum")
        return codes, recon.reshape(*pre.shape[:-1], -1) + self.b_dec
