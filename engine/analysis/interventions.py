"""SAE-aware interventions on a loaded model: splice in a reconstruction, steer, clamp."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Iterator, Mapping

import torch

from ..model.loading import LoadedModel
from ..saes import SAE

MAX_STEERED_LATENTS = 256
"""Latents one steering or clamp may touch: enough for any experiment a person sets up; more is a runaway request
(a URL or a script asking for thousands), refused rather than run token by token."""


def check_strengths(strengths: Mapping[int, float], d_sae: int | None = None) -> dict[int, float]:
    """``strengths`` (latent -> strength or clamp value) as plain ints and floats, after checking there are at most
    ``MAX_STEERED_LATENTS``, every latent is an integer in ``[0, d_sae)`` and every value a finite number."""
    if len(strengths) > MAX_STEERED_LATENTS:
        raise ValueError(f"{len(strengths)} latents to steer: at most {MAX_STEERED_LATENTS} at once")
    out: dict[int, float] = {}
    for latent, value in strengths.items():
        if isinstance(latent, bool) or not isinstance(latent, numbers.Integral):
            raise ValueError(f"latent ids are integers, got {latent!r}")
        if latent < 0 or (d_sae is not None and latent >= d_sae):
            raise ValueError(f"latent {latent} out of range: this SAE has {d_sae} latents" if d_sae is not None
                             else f"latent ids are >= 0, got {latent}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"the strength of latent {latent} must be a finite number, got {value!r}")
        out[int(latent)] = float(value)
    return out


def check_sae_fits(lm: LoadedModel, sae: SAE, hook_name: str | None = None) -> str:
    """The hook name the SAE attaches to, after checking the model has it and its width is ``d_in``."""
    hook = hook_name or sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE's config names no hook point; pass hook_name explicitly")
    point = lm.hooks.check(hook)
    width = lm.hook_width(hook)
    head = sae.cfg.hook_head_index
    if head is not None:
        if not point.n_heads:
            raise ValueError(
                f"the SAE reads one head (hook_head_index={head}), which needs a per-head hook point "
                f"(blocks.L.attn.hook_z); {hook} has no heads"
            )
        if head >= lm.n_heads:
            raise ValueError(f"hook_head_index={head} is out of range: the model has {lm.n_heads} heads at {hook}")
        width = lm.d_head
    if width != sae.cfg.d_in:
        what = f"one head's width {width}" if head is not None else f"width {width}"
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match the model's {what} at {hook} "
            f"(was this SAE trained on a different model?)"
        )
    if sae.is_transcoder and hook_name is None:
        lm.hooks.check(sae.hook_out)
        if lm.hook_width(sae.hook_out) != sae.d_out:
            raise ValueError(f"transcoder d_out={sae.d_out} does not match the model's width "
                             f"{lm.hook_width(sae.hook_out)} at its output hook {sae.hook_out}")
        if lm.hooks.names().index(sae.hook_out) <= lm.hooks.names().index(hook):
            raise ValueError(f"transcoder output hook {sae.hook_out} does not come after its input hook {hook}")
    return hook


def _as_act(vector: torch.Tensor, act: torch.Tensor, head_index: int | None = None) -> torch.Tensor:
    vector = vector.to(device=act.device, dtype=torch.float32)
    if head_index is not None:  # a one-head SAE's direction: that head's slice of [n_heads, d_head]
        if act.ndim < 2 or head_index >= act.shape[-2] or vector.shape[-1] != act.shape[-1]:
            raise ValueError(f"cannot add a vector of width {vector.shape[-1]} to head {head_index} of {tuple(act.shape)}")
        full = act.new_zeros(act.shape[-2:], dtype=torch.float32)
        full[head_index] = vector
        return full
    return vector.reshape(act.shape[-2:]) if vector.shape[-1] != act.shape[-1] else vector


@contextlib.contextmanager
def splice_sae(
    lm: LoadedModel,
    sae: SAE,
    *,
    add_error: bool = False,
    hook_name: str | None = None,
    mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Replace the activation at the SAE's hook by its reconstruction (plus the error if ``add_error``); for a
    transcoder, the activation at its output hook by its prediction from its input hook's activation.

    ``mask [batch, pos]`` (bool) limits the replacement to some positions (e.g. not position 0).
    """
    hook = check_sae_fits(lm, sae, hook_name)
    if sae.is_transcoder and hook_name is None:
        with _splice_transcoder(lm, sae, add_error=add_error, mask=mask):
            yield
        return

    def fn(x: torch.Tensor) -> torch.Tensor:
        x_in = sae.select_input(x)
        out = sae(x_in)
        new = (out.x_hat.float() + out.error) if add_error else out.x_hat.float()
        if mask is not None:
            keep = mask.to(x.device).reshape(*mask.shape, *([1] * (x_in.ndim - mask.ndim)))
            new = torch.where(keep, new, x_in.float())
        return sae.replace_input(x, new)

    with lm.hooks.intervene(hook, fn):
        yield


@contextlib.contextmanager
def _splice_transcoder(lm: LoadedModel, sae: SAE, *, add_error: bool, mask: torch.Tensor | None) -> Iterator[None]:
    """The input hook's activation, kept for this forward, predicts the output hook's (which comes later in it)."""
    seen: list[torch.Tensor] = []

    def read(x: torch.Tensor) -> None:
        seen.append(x)

    def write(y: torch.Tensor) -> torch.Tensor | None:
        x = seen.pop()
        if add_error:  # prediction + (true - prediction): the activation itself
            return None
        new = sae(x).x_hat.float()
        if mask is not None:
            new = torch.where(mask.to(y.device)[..., None], new, y.float())
        return new.to(y.dtype)

    with lm.hooks.intervene(sae.hook_in, read), lm.hooks.intervene(sae.hook_out, write):
        yield


def steering_vector(sae: SAE, strengths: Mapping[int, float], scales: Mapping[int, float] | None = None) -> torch.Tensor:
    """``sum_i strength_i * scale_i * W_dec[i]`` in float32 (scale = max activation for 'units of max act')."""
    vector = torch.zeros(sae.d_out, dtype=torch.float32, device=sae.device)
    for latent, strength in check_strengths(strengths, sae.cfg.d_sae).items():
        scale = 1.0 if scales is None else float(scales[latent])
        vector += strength * scale * sae.W_dec[latent].float()
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"the steering vector is not finite (strengths {dict(strengths)}, scales {scales}): a strength "
                         "or a latent's max activation is too large")
    return vector


@contextlib.contextmanager
def add_vector(lm: LoadedModel, hook_name: str, vector: torch.Tensor, *, head_index: int | None = None) -> Iterator[None]:
    """Add ``vector`` to the activation at ``hook_name`` at every position (to head ``head_index`` only when
    given: the steering vector of a one-head SAE)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x.float() + _as_act(vector, x, head_index)).to(x.dtype)

    with lm.hooks.intervene(hook_name, fn):
        yield


@contextlib.contextmanager
def clamp_latents(lm: LoadedModel, sae: SAE, values: Mapping[int, float]) -> Iterator[None]:
    """Set latents to fixed values: ``x + (c - f_i(x)) * W_dec[i]`` at every position."""
    hook = check_sae_fits(lm, sae)
    values = check_strengths(values, sae.cfg.d_sae)
    ids = torch.tensor(list(values), dtype=torch.long, device=sae.device)
    targets = torch.tensor(list(values.values()), dtype=torch.float32, device=sae.device)
    if not bool(torch.isfinite(targets).all()):
        raise ValueError(f"clamp values {list(values.values())} do not fit in float32")

    def fn(x: torch.Tensor) -> torch.Tensor:
        x_in = sae.select_input(x)
        current = sae.encode(x_in)[..., ids].float()
        delta = (targets - current) @ sae.W_dec[ids].float()
        if delta.shape[-1] != x_in.shape[-1]:
            delta = delta.unflatten(-1, x_in.shape[-2:])
        return sae.replace_input(x, x_in.float() + delta)

    if not sae.is_transcoder:
        with lm.hooks.intervene(hook, fn):
            yield
        return
    # a transcoder: the codes come from its input hook, the change goes where it writes
    deltas: list[torch.Tensor] = []

    def read(x: torch.Tensor) -> None:
        deltas.append((targets - sae.encode(x)[..., ids].float()) @ sae.W_dec[ids].float())

    def write(y: torch.Tensor) -> torch.Tensor:
        return y.float() + deltas.pop().to(y.device)

    with lm.hooks.intervene(sae.hook_in, read), lm.hooks.intervene(sae.hook_out, write):
        yield


def compute_copy(sae: SAE, lm: LoadedModel) -> SAE:
    """The SAE as precompute runs it: on the model's device, and in the model's dtype when that is bf16, or
    fp16 off the CPU (16-bit matmuls are several times faster on GPUs and AMX CPUs, while fp16 is slow on
    CPUs); the SAE's own weights are left untouched."""
    fast = lm.dtype == torch.bfloat16 or (lm.dtype == torch.float16 and lm.device.type != "cpu")
    dtype = lm.dtype if fast else sae.dtype
    if sae.dtype == dtype and sae.device == lm.device:
        return sae
    return copy.deepcopy(sae).to(device=lm.device, dtype=dtype)
