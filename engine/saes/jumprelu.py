"""JumpReLU SAE (also how BatchTopK and Matryoshka-BatchTopK SAEs are saved): zero below a per-latent threshold."""

import torch

from .base import SAE, register
from .config import SAEConfig


def jumprelu_codes(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReLU of the pre-activations, zero where they do not exceed the latent's threshold."""
    return torch.relu(pre) * (pre > threshold).to(pre.dtype)


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    threshold: torch.Tensor

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(cfg), "threshold": (cfg.d_sae,)}

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        return jumprelu_codes(sae_in @ self.W_enc + self.b_enc, self.threshold)
