"""The interface every SAE architecture implements, and the architecture registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from .config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


class ForwardOutput(NamedTuple):
    """Result of one SAE pass over activations ``x [..., d_in]``."""

    codes: torch.Tensor
    """Dense latent activations ``[..., d_sae]``."""
    x_hat: torch.Tensor
    """Reconstruction ``[..., d_in]`` (in the SAE's dtype); a transcoder's prediction of its output hook ``[..., d_out]``."""
    error: torch.Tensor
    """``target - x_hat`` in float32, where the target is ``x`` for an SAE and the output hook's activation for a
    transcoder (NaN when a transcoder is run without one)."""


class EncoderAffine(NamedTuple):
    """The affine map of the SAE input (normalised and centred, see ``process_in``) whose output decides which
    latents fire: ``pre = sae_in @ W + b``."""

    W: torch.Tensor
    """``[d_in, d_sae]``."""
    b: torch.Tensor
    """``[d_sae]``."""


class _Norm(NamedTuple):
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


class SAE(nn.Module):
    """Base class: input processing, normalisation and saving; subclasses define ``_encode``/``_decode``."""

    architecture: ClassVar[str]
    needs_loss_gradient: ClassVar[bool] = False
    """Its encoder selects with the next-token loss gradient at the hook (g-SAE): callers that can run a backward
    pass ``forward(x, grad=...)``; without one it falls back to its declared rule."""
    missing_hint: ClassVar[str] = ""
    """What a file without one of the architecture's own tensors lacks, in words (build_sae's error)."""

    # Registered as parameters in __init__ from ``tensor_shapes``; declared here for type checkers.
    # Matching pursuit has no W_enc/b_enc; architectures with extra tensors declare them in their class.
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        for name, shape in self.tensor_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape), requires_grad=False))

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every stored tensor (SAELens v6 names and orientation)."""
        return {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # --- where it reads and writes: one hook for an SAE, two for a transcoder ------------------------------
    @property
    def hook_in(self) -> str:
        """The hook point it reads (encodes)."""
        return self.cfg.hook_name

    @property
    def hook_out(self) -> str:
        """The hook point it writes (reconstructs or, for a transcoder, predicts): its splice, steering and error
        live there."""
        return self.cfg.hook_name_out or self.cfg.hook_name

    @property
    def d_out(self) -> int:
        """Width of what it writes (``d_in`` for an SAE)."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def is_transcoder(self) -> bool:
        """Reads one hook and writes another."""
        return self.hook_out != self.hook_in

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # --- input / output processing --------------------------------------------------
    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size | None]:
        if x.shape[-1] == self.cfg.d_in:
            return x, None
        if self.cfg.hook_head_index is not None:
            raise ValueError(
                f"this SAE reads one head (hook_head_index={self.cfg.hook_head_index}, d_in={self.cfg.d_in}): pass "
                f"sae.select_input(act) of the [..., n_heads, d_head] activation, not shape {tuple(x.shape)}"
            )
        if x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.cfg.d_in:
            return x.flatten(-2), x.shape
        raise ValueError(
            f"activation width {x.shape[-1]} (shape {tuple(x.shape)}) does not match this SAE's d_in={self.cfg.d_in}"
        )

    # --- where the SAE sits in its hook's activation ---------------------------------------
    def select_input(self, act: torch.Tensor) -> torch.Tensor:
        """What the SAE reads of its hook's activation: head ``hook_head_index`` of a per-head ``[..., n_heads,
        d_head]`` activation for a one-head SAE (SAELens' ``act[:, :, hook_head_index]``), else all of it."""
        head = self.cfg.hook_head_index
        if head is None:
            return act
        if act.ndim < 2 or act.shape[-1] != self.cfg.d_in or act.shape[-2] <= head:
            raise ValueError(
                f"this SAE reads head {head} of a per-head activation [..., n_heads, {self.cfg.d_in}]; "
                f"got shape {tuple(act.shape)}"
            )
        return act[..., head, :]

    def replace_input(self, act: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A copy of ``act`` whose ``select_input`` part is ``value`` (its other heads untouched), in ``act``'s dtype."""
        head = self.cfg.hook_head_index
        if head is None:
            return value.reshape(act.shape).to(act.dtype)
        new = act.clone()
        new[..., head, :] = value.to(act.dtype)
        return new

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, _Norm]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * scale, _Norm(scale=scale)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), _Norm(scale=std, shift=mu)
        return x, _Norm()

    def _denormalize(self, x: torch.Tensor, norm: _Norm) -> torch.Tensor:
        if self.cfg.normalize_activations == "constant_norm_rescale" and norm.scale is not None:
            return x / norm.scale
        if self.cfg.normalize_activations == "layer_norm" and norm.scale is not None and norm.shift is not None:
            return x * norm.scale + norm.shift
        return x

    def process_in(self, x: torch.Tensor) -> tuple[torch.Tensor, _Norm, torch.Size | None]:
        """Cast, flatten head dims, normalise and centre the input as SAELens does."""
        x, shape = self._flatten(x.to(self.dtype))
        x, norm = self._normalize(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, norm, shape

    # --- the interface ----------------------------------------------------------------
    def _encode(self, sae_in: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def _encode_decode(self, sae_in: torch.Tensor, **encode_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and (normalised-space) reconstruction; architectures with sparse codes override it."""
        codes = self._encode(sae_in, **encode_kwargs)
        return codes, self._decode(codes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[..., d_sae]`` for activations ``[..., d_in]``."""
        sae_in, _, _ = self.process_in(x)
        return self._encode(sae_in)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from codes (no input-norm undo: use ``forward`` for that)."""
        if codes.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"codes have width {codes.shape[-1]}, this SAE has d_sae={self.cfg.d_sae}")
        return self._decode(codes.to(self.dtype))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, **encode_kwargs: Any) -> ForwardOutput:
        """Encode and decode, undoing input normalisation and head flattening; the error is against ``target``
        (default ``x``).

        ``encode_kwargs`` reach the architecture's encoder (e.g. ``max_iterations`` for matching pursuit).
        """
        sae_in, norm, shape = self.process_in(x)
        codes, recon = self._encode_decode(sae_in, **encode_kwargs)
        x_hat = self._denormalize(recon, norm)
        if shape is not None:
            x_hat = x_hat.unflatten(-1, shape[-2:])
        return ForwardOutput(codes, x_hat, (x if target is None else target).float() - x_hat.float())

    def encoder_affine(self) -> EncoderAffine:
        """The pre-activation as an affine map of the SAE input (ReLU, JumpReLU: ``W_enc``, ``b_enc``); a
        ValueError for encoders that are not one (matching pursuit)."""
        return EncoderAffine(self.W_enc, self.b_enc)

    def decoder_directions(self) -> torch.Tensor:
        """Rows of ``W_dec`` ``[d_sae, d_in]``: each latent's write direction."""
        return self.W_dec

    def save(self, path: str | Path) -> Path:
        """Write an SAELens v6 directory (``cfg.json`` + ``sae_weights.safetensors``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CFG_FILE).write_text(json.dumps(self.cfg.to_saelens_dict(), indent=2))
        return path

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, hook={self.cfg.hook_name!r}"


_REGISTRY: dict[str, type[SAE]] = {}


_Arch = TypeVar("_Arch", bound=type[SAE])


def register(cls: _Arch) -> _Arch:
    """Class decorator adding an architecture to the registry (duplicates refused)."""
    if cls.architecture in _REGISTRY:
        raise ValueError(f"SAE architecture {cls.architecture!r} is already registered")
    _REGISTRY[cls.architecture] = cls
    return cls


def architectures() -> list[str]:
    """Registered architecture names."""
    return sorted(_REGISTRY)


def sae_class(architecture: str) -> type[SAE]:
    """The class for ``architecture``, or a ValueError naming the known ones."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture {architecture!r}; known architectures: {', '.join(architectures())}"
        ) from None
