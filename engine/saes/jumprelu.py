"""JumpReLU SAE (also how BatchTopK and Matryoshka-BatchTopK SAEs are saved): zero below a per-latent threshold."""

import torch

from .base import SAE, register
from .config import SAEConfig


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    threshold: torch.Tensor

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(cfg), "threshold": (cfg.d_sae,)}

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        pre = sae_in @ self.W_enc + self.b_enc
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
