"""Resuming a forward pass from the residual stream at a hook: run only the layers after it.

The decoder blocks after the hook are called one by one with the attention masks and rotary
embeddings built the way the model's own forward builds them, then the final norm and LM head.
Entering through ``inputs_embeds`` instead would re-add GPT-2's position embeddings and give
sliced mixed-attention stacks (Qwen 2, Gemma 2/3) the wrong layer types. Nothing on the shared
model is changed, so threads can resume on one model at once.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compat import cache_argument
from .families import get_path, parse_hook_name
from .loading import LoadedModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
_CACHE_ARG = cache_argument(create_causal_mask)


def _start_layer(hook_name: str) -> int | None:
    layer, kind = parse_hook_name(hook_name)
    if kind == "hook_resid_pre":
        return layer
    if kind == "hook_resid_post":
        return layer + 1
    return None


def _decoder(lm: LoadedModel) -> tuple[PreTrainedModel, nn.ModuleList] | None:
    """The model that owns the decoder blocks (its config and rotary embedding), and the blocks."""
    for path in lm.family.layers:
        layers = get_path(lm.model, path)
        if layers is not None:
            parent = path.rpartition(".")[0]
            base = get_path(lm.model, parent) if parent else lm.model
            assert base is not None  # the parent of a present path is present
            # Hugging Face decoders (LlamaModel, GPT2Model, ...) are PreTrainedModels holding a ModuleList
            return cast("PreTrainedModel", base), cast(nn.ModuleList, layers)
    return None


def can_resume(lm: LoadedModel, hook_name: str) -> bool:
    """Whether ``resume_logits`` supports this model and hook."""
    decoder = _decoder(lm)
    return (
        hook_name in lm.hooks.points
        and _start_layer(hook_name) is not None
        and decoder is not None
        and (lm.family.rotary is None or get_path(decoder[0], lm.family.rotary) is not None)
        and lm.hf_model.get_output_embeddings() is not None
    )


def _layer_type(config: PretrainedConfig, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    # without per-layer types, a configured window applies to every layer (Mistral)
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def _rotary(module: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    # Gemma 3 keeps one rotary base per layer type and takes the type as an argument
    if "layer_type" in inspect.signature(module.forward).parameters:
        return module(hidden, position_ids, layer_type)
    return module(hidden, position_ids)


@torch.inference_mode()
def resume_logits(
    lm: LoadedModel, hook_name: str, resid: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` from residual ``resid [batch, pos, d_model]`` at ``hook_name`` on.

    ``attention_mask [batch, pos]`` marks padding as in a full forward; None means every position is real.
    """
    if not can_resume(lm, hook_name):
        raise ValueError(f"cannot resume a forward at {hook_name} for the {lm.family.name} family")
    if resid.ndim != 3 or resid.shape[-1] != lm.d_model:
        raise ValueError(f"resid must be [batch, pos, {lm.d_model}], got {tuple(resid.shape)}")
    decoder, start = _decoder(lm), _start_layer(hook_name)
    assert decoder is not None and start is not None  # can_resume checked both
    base, layers = decoder
    config = base.config
    hidden = resid.to(lm.device, lm.dtype)
    mask_2d = None if attention_mask is None else attention_mask.to(lm.device)
    position_ids = torch.arange(hidden.shape[1], device=lm.device).unsqueeze(0)
    rotary = get_path(base, lm.family.rotary) if lm.family.rotary else None
    masks: dict[str, object] = {}
    positions: dict[str, object] = {}
    for index in range(start, len(layers)):
        kind = _layer_type(config, index)
        if kind not in masks:
            mask_args: dict[str, Any] = {"config": config, "inputs_embeds": hidden, "attention_mask": mask_2d,
                                         "position_ids": position_ids, _CACHE_ARG: None}
            masks[kind] = _MASKS[kind](**mask_args)
        kwargs = {"attention_mask": masks[kind], "position_ids": position_ids}
        if rotary is not None:
            if kind not in positions:
                positions[kind] = _rotary(rotary, hidden, position_ids, kind)
            kwargs["position_embeddings"] = positions[kind]
        hidden = layers[index](hidden, **kwargs)
    head = lm.hf_model.get_output_embeddings()
    assert head is not None  # can_resume checked it
    logits = head(lm.final_norm()(hidden))
    cap = getattr(lm.model.config, "final_logit_softcapping", None) if lm.family.softcap_logits else None
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
