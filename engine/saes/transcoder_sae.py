"""Transcoders as SAEs: the four architectures ``transcoder`` (ReLU), ``skip_transcoder`` (ReLU plus ``W_skip``),
``jumprelu_transcoder`` and ``topk_transcoder``, registered so that ``load_sae`` returns one and precompute, the lens
and steering run it like any SAE. They read ``hook_in`` (``cfg.hook_name``) and write ``hook_out``
(``cfg.hook_name_out``): ``x_hat`` is the prediction of the output hook, and the error is against it (``forward``'s
``target``). Tensors as SAELens writes them: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
``W_skip [d_out, d_in]``, ``threshold [d_sae]``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SAE, ForwardOutput, register
from .config import SAEConfig
from .jumprelu import jumprelu_codes

TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "topk_transcoder")


@register
class TranscoderSAE(SAE):
    """ReLU transcoder: ``y_hat = relu(x @ W_enc + b_enc) @ W_dec + b_dec``."""

    architecture = "transcoder"
    has_skip = False
    W_skip: torch.Tensor
    """``[d_out, d_in]``: registered only where ``has_skip``."""

    def __init__(self, cfg: SAEConfig):
        if not cfg.hook_name_out:
            raise ValueError(f"a {cfg.architecture} config must name its output hook (hook_name_out)")
        if cfg.normalize_activations != "none" or cfg.reshape_activations != "none" or cfg.hook_head_index is not None:
            raise ValueError(f"{cfg.architecture}: input normalisation, reshaping and head selection are not supported "
                             "for transcoders (normalize_activations must be 'none')")
        super().__init__(cfg)

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        d_out = cfg.d_out or cfg.d_in
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, d_out), "b_dec": (d_out,)}
        if cls.has_skip:
            shapes["W_skip"] = (d_out, cfg.d_in)
        return shapes

    def process_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Size | None]:
        """Cast and check the width; ``b_dec`` lives on the output side, so it is never subtracted from the input."""
        x, shape = self._flatten(x.to(self.dtype))
        return x, None, shape

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        return (sae_in @ self.W_enc + self.b_enc).relu()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, **encode_kwargs: Any) -> ForwardOutput:
        """Codes, the prediction of the output hook (with the skip term) and the error against ``target`` (the
        output hook's activation; NaN without it)."""
        sae_in, _, _ = self.process_in(x)
        codes, y_hat = self._encode_decode(sae_in, **encode_kwargs)
        if self.has_skip:
            y_hat = y_hat + sae_in @ self.W_skip.T
        error = (target.float() - y_hat.float()) if target is not None else torch.full_like(y_hat, float("nan"),
                                                                                            dtype=torch.float32)
        return ForwardOutput(codes, y_hat, error)

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, d_out={self.d_out}, "
                f"reads={self.hook_in!r}, writes={self.hook_out!r}")


@register
class SkipTranscoderSAE(TranscoderSAE):
    """ReLU transcoder with a linear skip path: ``y_hat = ... + x @ W_skip.T``."""

    architecture = "skip_transcoder"
    has_skip = True


@register
class JumpReLUTranscoderSAE(TranscoderSAE):
    """Zero below a per-latent threshold on the pre-activation."""

    architecture = "jumprelu_transcoder"
    threshold: torch.Tensor

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(cfg), "threshold": (cfg.d_sae,)}

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        return jumprelu_codes(sae_in @ self.W_enc + self.b_enc, self.threshold)


@register
class TopKTranscoderSAE(TranscoderSAE):
    """The k largest pre-activations per token, ReLU'd (saescope's extension of SAELens' formats)."""

    architecture = "topk_transcoder"

    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        k = self.cfg.k
        assert k is not None  # SAEConfig refuses a topk_transcoder without one
        pre = sae_in @ self.W_enc + self.b_enc
        values, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values.relu())
