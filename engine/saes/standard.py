"""Standard (ReLU) SAE."""

import torch

from .base import SAE, register


@register
class StandardSAE(SAE):
    architecture = "standard"

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        return torch.relu(sae_in @ self.W_enc + self.b_enc)
