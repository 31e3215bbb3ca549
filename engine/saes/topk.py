"""TopK SAE: keep the k largest pre-activations per token (ReLU'd)."""

import torch

from .base import SAE, register


@register
class TopKSAE(SAE):
    architecture = "topk"

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            codes = codes / self.W_dec.norm(dim=-1)
        return codes @ self.W_dec + self.b_dec
