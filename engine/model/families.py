"""Model families: where each hook point lives in a Hugging Face module tree.

Families are mapped once here (by ``config.model_type``); nothing else in the
engine looks at model names or types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from torch import nn

HOOK_KINDS = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
"""Hook kinds in the order the forward pass reaches them inside one block. ``ln2.hook_normalized`` is the MLP's input
(the residual stream after the pre-MLP norm; TransformerLens's name): what a transcoder reads."""

_HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out|attn\.hook_z|ln2\.hook_normalized)$")


@dataclass(frozen=True)
class Family:
    """Attribute paths of one architecture family's modules, and the facts of its forward that differ."""

    name: str
    """Short family name, shown to users and written to run manifests."""
    model_types: tuple[str, ...]
    """The ``config.model_type`` values of this family."""
    layers: tuple[str, ...]
    """Candidate dotted paths (from the causal-LM root) to the list of decoder blocks."""
    final_norm: tuple[str, ...]
    """Candidate dotted paths (from the causal-LM root) to the norm before the LM head."""
    attn: str
    """Attention module inside a decoder block."""
    out_proj: str
    """Attention output projection inside ``attn``; its input is ``hook_z``."""
    mlp: str
    """MLP module inside a decoder block; its output is ``hook_mlp_out`` unless ``mlp_out`` is set."""
    attn_out: str | None = None
    """Module whose output is ``hook_attn_out`` when it is not ``attn`` (Gemma 2/3 post-norms)."""
    mlp_out: str | None = None
    """Module whose output is ``hook_mlp_out`` when it is not ``mlp`` (Gemma 2/3 post-norms)."""
    rotary: str | None = "rotary_emb"
    """Rotary embedding module beside the decoder blocks; None where positions are already in the residual (GPT-2)."""
    softcap_logits: bool = False
    """The causal-LM head soft-caps logits by ``config.final_logit_softcapping`` (Gemma 2/3)."""
    norm_scale_plus_one: bool = False
    """Its RMSNorms, the final one included, store ``w`` and scale by ``1 + w`` rather than by ``w`` (Gemma 1-3)."""


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), ("transformer.h",), ("transformer.ln_f",), "attn", "c_proj", "mlp", rotary=None),
    Family(
        "llama",
        ("llama", "qwen2", "qwen3", "mistral", "smollm3"),
        ("model.layers",),
        ("model.norm",),
        "self_attn",
        "o_proj",
        "mlp",
    ),
    Family("gpt_neox", ("gpt_neox",), ("gpt_neox.layers",), ("gpt_neox.final_layer_norm",), "attention", "dense", "mlp"),
    Family("gemma", ("gemma",), ("model.layers",), ("model.norm",), "self_attn", "o_proj", "mlp", norm_scale_plus_one=True),
    Family(
        "gemma2",
        ("gemma2", "gemma3_text", "gemma3"),
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
        ("model.norm", "model.language_model.norm", "language_model.model.norm"),
        "self_attn",
        "o_proj",
        "mlp",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        softcap_logits=True,
        norm_scale_plus_one=True,
    ),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` saescope knows how to hook."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family of a ``config.model_type``, or a ValueError naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported model family {model_type!r}: saescope supports "
        f"{', '.join(supported_model_types())} (GPT-2, Llama/SmolLM/Qwen/Mistral, GPT-NeoX, Gemma 1-3)"
    )


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``path='a.b.c'``, or None when any step is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def first_path(root: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    """The first of ``paths`` present under ``root``."""
    for path in paths:
        module = get_path(root, path)
        if module is not None:
            return module
    raise ValueError(f"could not find the {what} (looked for {', '.join(paths)}) in {type(root).__name__}")


def decoder_layers(root: nn.Module, family: Family) -> nn.ModuleList:
    """The decoder blocks of ``root``, a causal LM of ``family`` (Hugging Face keeps them in a ``ModuleList``)."""
    return cast(nn.ModuleList, first_path(root, family.layers, "decoder blocks"))


def parse_hook_name(name: str) -> tuple[int, str]:
    """Split ``blocks.{L}.{kind}`` into ``(L, kind)``; ValueError when malformed."""
    match = _HOOK_RE.match(name)
    if match is None:
        raise ValueError(
            f"malformed hook name {name!r}: expected blocks.{{L}}.{{kind}} with kind one of {', '.join(HOOK_KINDS)}"
        )
    return int(match.group(1)), match.group(2)


def hook_names(n_layers: int) -> list[str]:
    """All hook point names of a model with ``n_layers`` blocks, in forward order."""
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in HOOK_KINDS]
