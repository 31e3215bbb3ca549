"""Matching-pursuit SAE (MP-SAE) as SAELens stores it: tied encoder, greedy residual-guided steps."""

from __future__ import annotations

import torch

from .base import SAE, EncoderAffine, register
from .config import SAEConfig


@register
class MatchingPursuitSAE(SAE):
    architecture = "matching_pursuit"

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {"W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}

    def encoder_affine(self) -> EncoderAffine:
        raise ValueError(
            "a matching-pursuit SAE has no linear encoder (its codes come from greedy residual steps): "
            "attribution to heads and source tokens needs a linear encoder"
        )

    def encode(self, x: torch.Tensor, *, max_iterations: int | None = None) -> torch.Tensor:
        """Codes after at most ``max_iterations`` pursuit steps (default: the config's, else d_in)."""
        sae_in, _, _ = self.process_in(x)
        return self._encode(sae_in, max_iterations=max_iterations)

    def _encode(self, sae_in: torch.Tensor, max_iterations: int | None = None) -> torch.Tensor:
        steps = max_iterations or self.cfg.max_iterations or self.cfg.d_in
        lead = sae_in.shape[:-1]
        residual = sae_in.reshape(-1, self.cfg.d_in).clone()
        W_dec = self.W_dec
        codes = residual.new_zeros(residual.shape[0], self.cfg.d_sae)
        support = torch.zeros_like(codes, dtype=torch.bool)
        done = torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
        threshold = self.cfg.residual_threshold
        for _ in range(steps):
            idx = (residual @ W_dec.T).relu().argmax(dim=1, keepdim=True)
            atom = W_dec[idx.squeeze(1)]
            value = (residual * atom).sum(-1, keepdim=True).relu() * (~done).unsqueeze(1).to(residual.dtype)
            codes.scatter_add_(1, idx, value)
            residual = residual - value * atom
            if self.cfg.stop_on_duplicate_support:
                new_support = codes != 0
                done = done | (new_support == support).all(dim=1)
                support = new_support
            if threshold > 0:
                done = done | (residual.norm(dim=-1) < threshold)
            if done.all():
                break
        return codes.reshape(*lead, self.cfg.d_sae)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = codes @ self.W_dec
        return out + self.b_dec if self.cfg.apply_b_dec_to_input else out
