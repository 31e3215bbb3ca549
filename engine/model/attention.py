"""One layer's attention from one forward: the pattern and each head's value vectors.

sdpa returns no attention weights, and the queries and keys it attends with are built inside each family's
attention code (fused ``c_attn`` / ``query_key_value`` projections, rotary on all or part of a head, q/k norms,
per-family scaling, Gemma 2's logit soft-capping). So nothing here rebuilds them: the forward records the
attention module's inputs (hidden states, mask, rotary tables) and stops at its ``hook_z``; then the module's
own code runs twice more on those inputs with the ``eager`` implementation, on a twin that shares every
weight and differs only in its config: once with the forward's mask, which returns the pattern, and once
with a mask that lets each position attend only to itself, whose ``hook_z`` is then each position's value
vector per query head (``v_kv(h)`` under grouped-query attention; a softmax over one position is exactly 1).
Both re-runs cost one attention layer each; the shared model is never changed, so threads can capture at once.
"""

from __future__ import annotations

import copy
import inspect
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .families import decoder_layers
from .hooks import ActFn, StopForward
from .loading import LoadedModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class AttentionCapture:
    """Layer ``layer``'s attention on a batch of contexts (float32, on the model's device)."""

    layer: int
    z: torch.Tensor
    """``[batch, pos, n_heads, d_head]``: ``attn.hook_z`` of the forward (the SAE's input)."""
    pattern: torch.Tensor
    """``[batch, n_heads, dest, src]``: attention weights, zero above the diagonal."""
    values: torch.Tensor
    """``[batch, src, n_heads, d_head]``: the value vector each query head reads at each source position."""


def attention_module(lm: LoadedModel, layer: int) -> nn.Module:
    """The attention module of block ``layer``."""
    layers = decoder_layers(lm.model, lm.family)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
    return getattr(layers[layer], lm.family.attn)


def _eager_twin(attn: nn.Module) -> nn.Module:
    """``attn`` with the eager attention implementation: same parameters and submodules, own config copy."""
    twin = copy.copy(attn)  # a new __dict__; _parameters/_modules are the original's (shared weights and hooks)
    config = copy.copy(cast("PretrainedConfig", attn.config))
    # the property setter would also switch the (shared) sub-configs; this config's own field is all we need
    config._attn_implementation_internal = "eager"  # pyright: ignore[reportPrivateUsage]  (no public way: see above)
    twin.__dict__["config"] = config  # a plain attribute, as nn.Module.__setattr__ would store it
    return twin


def _additive(mask: object, n_pos: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The forward's attention mask as eager attention adds it: 0 where attended, the dtype's minimum elsewhere.

    ``mask`` is whatever the forward passed the attention module: None, a tensor, or another implementation's mask
    object (flex attention's ``BlockMask``), which is refused."""
    if mask is None:  # sdpa's causal shortcut: no padding, no window shorter than the context
        keep = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril()[None, None]
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        keep = mask
    elif isinstance(mask, torch.Tensor) and mask.is_floating_point():
        keep = mask > torch.finfo(mask.dtype).min / 2
    else:
        raise ValueError(f"cannot read an attention mask of type {type(mask).__name__} (flex/flash attention?)")
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


@torch.inference_mode()
def capture_attention(lm: LoadedModel, layer: int, input_ids: torch.Tensor | list[int]) -> AttentionCapture:
    """Pattern, values and ``hook_z`` of layer ``layer`` for ``input_ids [batch, pos]`` (or one list of ids).

    The contexts are unpadded; the forward stops at the layer's ``hook_z``.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = (ids[None] if ids.ndim == 1 else ids).to(lm.device)
    attn, hook_z = attention_module(lm, layer), f"blocks.{layer}.attn.hook_z"
    owner = threading.get_ident()
    seen: dict[str, Any] = {}

    def record_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if threading.get_ident() == owner and "call" not in seen:  # other threads' forwards pass untouched
            seen["call"] = inspect.signature(module.forward).bind(*args, **kwargs)

    def record_z(key: str) -> ActFn:
        def fn(z: torch.Tensor) -> None:
            seen[key] = z.float()
            raise StopForward

        return fn

    handle = attn.register_forward_pre_hook(record_inputs, with_kwargs=True)
    try:
        with lm.hooks.intervene(hook_z, record_z("z")):
            try:
                lm.model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if "call" not in seen or "z" not in seen:
        raise RuntimeError(f"the forward did not reach layer {layer}'s attention")
    call: inspect.BoundArguments = seen["call"]
    n_pos, dtype = ids.shape[1], lm.dtype
    twin = _eager_twin(attn)

    def run(mask: torch.Tensor) -> tuple[Any, ...]:
        """The twin's output (attention output, weights) on the recorded inputs with ``mask``."""
        arguments: dict[str, Any] = {**call.arguments, "attention_mask": mask}
        kwargs: dict[str, Any] = arguments.pop("kwargs", {})
        return twin.forward(**arguments, **kwargs)

    pattern = run(_additive(call.arguments.get("attention_mask"), n_pos, dtype, lm.device))[1]
    if pattern is None:
        raise RuntimeError(f"the eager attention of {type(attn).__name__} returned no weights")
    self_only = torch.full((n_pos, n_pos), torch.finfo(dtype).min, dtype=dtype, device=lm.device).fill_diagonal_(0)
    with lm.hooks.intervene(hook_z, record_z("values")):
        try:
            run(self_only[None, None])
        except StopForward:
            pass
    return AttentionCapture(layer=layer, z=seen["z"], pattern=pattern.float(), values=seen["values"])
