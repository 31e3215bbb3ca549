"""Gated SAE: a gate path decides which latents fire, a rescaled magnitude path says how much."""

import torch

from .base import SAE, EncoderAffine, register
from .config import SAEConfig


@register
class GatedSAE(SAE):
    architecture = "gated"

    b_gate: torch.Tensor
    r_mag: torch.Tensor
    b_mag: torch.Tensor

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_gate": (cfg.d_sae,),
            "r_mag": (cfg.d_sae,),
            "b_mag": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }

    def encoder_affine(self) -> EncoderAffine:
        """The gate path, which decides firing (the magnitude path is the same direction scaled by ``exp(r_mag)``)."""
        return EncoderAffine(self.W_enc, self.b_gate)

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        gate = (sae_in @ self.W_enc + self.b_gate) > 0
        magnitude = torch.relu(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return gate.to(magnitude.dtype) * magnitude
