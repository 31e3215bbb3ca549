"""Resuming a forward pass from the residual stream at a hook: run only the layers after it.

Used by the prompt lens to get SAE-spliced logits without recomputing the layers before the hook.
Supported where the family's decoder stack can be entered through ``inputs_embeds`` unchanged
(the Llama family with one attention type); callers fall back to a full spliced forward otherwise.
"""

from __future__ import annotations

import copy

import torch

from .families import parse_hook_name
from .models import LoadedModel


def _start_layer(hook_name: str) -> int | None:
    layer, kind = parse_hook_name(hook_name)
    if kind == "hook_resid_pre":
        return layer
    if kind == "hook_resid_post":
        return layer + 1
    return None


def can_resume(lm: LoadedModel, hook_name: str) -> bool:
    """Whether ``resume_logits`` supports this model and hook."""
    layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
    return (
        lm.family.name == "llama"
        and _start_layer(hook_name) is not None
        and len(set(layer_types)) == 1
        and hasattr(lm.model, "model")
        and hasattr(lm.model, "lm_head")
    )


@torch.inference_mode()
def resume_logits(lm: LoadedModel, hook_name: str, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` from residual stream ``resid`` at ``hook_name`` through the remaining layers."""
    if not can_resume(lm, hook_name):
        raise ValueError(f"cannot resume a forward at {hook_name} for the {lm.family.name} family")
    base = lm.model.model
    tail = copy.copy(base)  # shares parameters; only the layer list differs, and the shared model is untouched
    tail._modules = dict(base._modules)
    tail.layers = base.layers[_start_layer(hook_name) :]
    hidden = tail(inputs_embeds=resid.to(lm.dtype), use_cache=False).last_hidden_state
    return lm.model.lm_head(hidden)
