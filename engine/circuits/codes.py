"""The seed method's SAE: one small ReLU SAE over all heads' outputs, and each head's argmax code.

As the reference (charlieoneill11/sae-circuits ``sae.py`` / ``train.py``) defines it: a tied bias ``b`` (zero at
the start) subtracted before the encoder and added after the decoder; encoder rows and decoder rows kept at unit
norm (renormalised before every use, and the gradient's component along each row removed); loss = mean squared
error over all elements + ``l1`` x the mean over (prompt, head) of the codes' L1 norm; Adam, full batch, on
``n_train`` prompts drawn at random from positives and negatives together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeSAEConfig:
    """How the heads' SAE is trained (the reference's defaults)."""

    n_latents: int = 200
    """Latents of the SAE over head outputs."""
    l1: float = 0.02
    """Weight of the L1 penalty."""
    lr: float = 1e-3
    """Adam learning rate."""
    epochs: int = 500
    """Full-batch epochs."""
    n_train: int = 10
    """Prompts (positives and negatives drawn together) the SAE is trained on."""
    seed: int = 0
    """Seed of the initialisation and of the draw of training prompts."""

    def __post_init__(self) -> None:
        for name in ("n_latents", "epochs", "n_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.l1 < 0 or self.lr <= 0:
            raise ValueError(f"l1 must be >= 0 and lr > 0, got l1={self.l1}, lr={self.lr}")


@dataclass(frozen=True)
class CodeSAE:
    """Trained weights: ``W_enc [n_latents, d]``, ``b_enc [n_latents]``, ``W_dec [d, n_latents]``, ``b [d]``."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b: torch.Tensor
    losses: tuple[float, ...]
    """Training loss after every epoch."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., n_latents]`` of ``x [..., d]``."""
        return torch.relu((x.float() - self.b) @ self.W_enc.T + self.b_enc)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The argmax latent of each ``x [..., d]`` (latent 0 where none is active, as numpy's argmax gives)."""
        return self.encode(x).argmax(dim=-1)


def _unit_rows(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_(torch.nn.functional.normalize(weight, dim=-1))


def _tangent(weight: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        unit = weight.detach() / weight.detach().norm(dim=-1, keepdim=True)
        return grad - (grad * weight.detach()).sum(-1, keepdim=True) * unit

    return hook


def loss_fn(x: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor, l1: float) -> torch.Tensor:
    """The reference's loss: MSE over all elements + ``l1`` x mean L1 norm of the codes of each (prompt, head)."""
    return torch.nn.functional.mse_loss(recon, x) + l1 * codes.reshape(-1, codes.shape[-1]).abs().sum(-1).mean()


def train_code_sae(x: torch.Tensor, cfg: CodeSAEConfig) -> CodeSAE:
    """Train on ``x [n_prompts, n_heads, d]`` (``cfg.n_train`` of its prompts, drawn with ``cfg.seed``)."""
    x = x.detach().float().cpu()
    gen = torch.Generator().manual_seed(cfg.seed)
    train = x[torch.randperm(x.shape[0], generator=gen)[: cfg.n_train]]
    d, n = x.shape[-1], cfg.n_latents
    W_enc = torch.nn.Parameter(torch.randn(n, d, generator=gen))
    b_enc = torch.nn.Parameter((torch.rand(n, generator=gen) * 2 - 1) / math.sqrt(d))
    W_dec = torch.nn.Parameter(torch.randn(d, n, generator=gen))
    b = torch.nn.Parameter(torch.zeros(d))
    for weight in (W_enc, W_dec):
        _unit_rows(weight)
        weight.register_hook(_tangent(weight))
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b], lr=cfg.lr)
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            _unit_rows(W_enc)
            _unit_rows(W_dec)
            optimizer.zero_grad()
            codes = torch.relu((train - b) @ W_enc.T + b_enc)
            loss = loss_fn(train, codes, codes @ W_dec.T + b, cfg.l1)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    _unit_rows(W_enc)  # as the reference's forward does before encoding
    _unit_rows(W_dec)
    return CodeSAE(W_enc.detach(), b_enc.detach(), W_dec.detach(), b.detach(), tuple(losses))
