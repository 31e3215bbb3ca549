"""The local replacement model's linear skeleton: a model's forward written out per family, run once for real (it
records each norm's scale and each attention pattern, and each MLP's input and output) and then again with those
frozen, where the residual stream is linear in what is written into it: the token embeddings and each layer's MLP
write. Nothing here touches the shared model (no hooks, no config changes), so threads may build graphs at once.

Only the families whose forward is written out here are supported (``ADAPTERS``); the rest are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..model.families import decoder_layers
from ..model.loading import LoadedModel


@dataclass(frozen=True)
class Norm:
    """A LayerNorm (centred, maybe biased) or an RMSNorm, as weights: ``(x [- mean]) * scale * w (+ b)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    centred: bool

    @staticmethod
    def of(module: nn.Module, plus_one: bool = False) -> Norm:
        weight = cast(torch.Tensor, module.weight).detach().float()
        bias = getattr(module, "bias", None)
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-5)
        return Norm(1.0 + weight if plus_one else weight, None if bias is None else bias.detach().float(), float(eps),
                    isinstance(module, nn.LayerNorm))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-position factor ``1/sqrt(var + eps)`` (or ``1/sqrt(mean x^2 + eps)``) the real forward uses."""
        centred = x - x.mean(-1, keepdim=True) if self.centred else x
        return torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Linear in ``x`` for a fixed ``scale`` (plus the bias)."""
        centred = x - x.mean(-1, keepdim=True) if self.centred else x
        out = centred * scale * self.weight
        return out if self.bias is None else out + self.bias


class Adapter:
    """One family's forward, split where the local replacement model needs it."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.blocks: list[Any] = list(decoder_layers(lm.model, lm.family))  # family-specific submodules

    def check(self, n_pos: int) -> None:
        """Refuse what this adapter does not reproduce (a ValueError naming it)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[pos, d]``: the residual stream entering block 0 (what the token nodes write)."""
        raise NotImplementedError

    def norms(self, layer: int) -> tuple[Norm, Norm]:
        raise NotImplementedError

    def final_norm(self) -> Norm:
        return Norm.of(self.lm.final_norm(), self.lm.family.norm_scale_plus_one)

    def values(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """``[..., pos, heads, d_head]`` value vectors per query head from the normalised stream ``a``."""
        raise NotImplementedError

    def pattern(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """``[heads, dest, src]``: the real attention pattern on ``a [pos, d]``."""
        raise NotImplementedError

    def out_proj(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, layer: int, a: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Attention output with a given pattern: linear in ``a`` (plus biases)."""
        v = self.values(layer, a)  # [..., src, heads, d_head]
        z = torch.einsum("hds,...she->...dhe", pattern, v)
        return self.out_proj(layer, z.flatten(-2))


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class LlamaAdapter(Adapter):
    """Llama, SmolLM, Qwen 2, Mistral: RMSNorm, rotary positions, grouped-query attention, gated MLP."""

    def check(self, n_pos: int) -> None:
        config = self.lm.config
        attn = getattr(self.blocks[0], self.lm.family.attn)
        if hasattr(attn, "q_norm"):
            raise ValueError(f"attribution graphs do not support {config.model_type} (q/k norms are not implemented)")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and n_pos > int(window):
            raise ValueError(f"the prompt ({n_pos} tokens) is longer than the model's sliding window ({window})")
        if getattr(config, "no_rope_layers", None) is not None:
            raise ValueError(f"attribution graphs do not support {config.model_type} (layers without rotary positions)")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.hf_model.get_input_embeddings()(ids).float()

    def norms(self, layer: int) -> tuple[Norm, Norm]:
        block = self.blocks[layer]
        plus = self.lm.family.norm_scale_plus_one
        return Norm.of(block.input_layernorm, plus), Norm.of(block.post_attention_layernorm, plus)

    def _attn(self, layer: int) -> Any:
        return getattr(self.blocks[layer], self.lm.family.attn)

    def values(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        attn = self._attn(layer)
        v = _linear(attn.v_proj, a).unflatten(-1, (-1, self.lm.d_head))  # [..., pos, kv_heads, d_head]
        return v.repeat_interleave(self.lm.n_heads // v.shape[-2], dim=-2)

    def pattern(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        attn, d_head = self._attn(layer), self.lm.d_head
        q = _linear(attn.q_proj, a).unflatten(-1, (-1, d_head)).transpose(0, 1)[None]  # [1, heads, pos, d_head]
        k = _linear(attn.k_proj, a).unflatten(-1, (-1, d_head)).transpose(0, 1)[None]
        positions = torch.arange(a.shape[0], device=a.device)[None]
        rotary = self.lm.model.get_submodule(self.lm.family.layers[0].rpartition(".")[0] + ".rotary_emb")
        cos, sin = rotary(a[None], positions)
        q, k = rotate(q, cos.float(), sin.float()), rotate(k, cos.float(), sin.float())
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return _causal_softmax(q[0] @ k[0].transpose(-1, -2) * float(attn.scaling))

    def out_proj(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return _linear(self._attn(layer).o_proj, z)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return getattr(self.blocks[layer], self.lm.family.mlp)(h.to(self.lm.dtype)).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``x [batch, heads, pos, d_head]`` with the model's ``cos``/``sin [batch, pos, d_head]``
    (the rotary embedding's outputs): ``x cos + rotate_half(x) sin``, where ``rotate_half`` maps the halves
    ``(x1, x2)`` of the head dimension to ``(-x2, x1)`` (the Llama family's convention). Written here rather than
    imported from a model file of transformers, whose internals move between releases."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class GPT2Adapter(Adapter):
    """GPT-2: LayerNorm, learned positions added to the token embedding, fused qkv projection (Conv1D)."""

    def check(self, n_pos: int) -> None:
        config = self.lm.config
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("attribution graphs do not support GPT-2 configs with scale_attn_by_inverse_layer_idx")
        if n_pos > self.lm.max_context:
            raise ValueError(f"the prompt ({n_pos} tokens) is longer than the model's context ({self.lm.max_context})")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        transformer: Any = self.lm.model.get_submodule("transformer")
        positions = torch.arange(ids.shape[0], device=ids.device)
        return (transformer.wte(ids) + transformer.wpe(positions)).float()

    def norms(self, layer: int) -> tuple[Norm, Norm]:
        block = self.blocks[layer]
        return Norm.of(block.ln_1), Norm.of(block.ln_2)

    def _qkv(self, layer: int, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_attn = self.blocks[layer].attn.c_attn
        qkv = a @ _param(c_attn, "weight") + _param(c_attn, "bias")
        return tuple(t.unflatten(-1, (self.lm.n_heads, -1)) for t in qkv.chunk(3, dim=-1))

    def values(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        return self._qkv(layer, a)[2]

    def pattern(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(layer, a)  # [pos, heads, d_head]
        scores = torch.einsum("dhe,she->hds", q, k) * float(self.blocks[layer].attn.scaling)
        return _causal_softmax(scores)

    def out_proj(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        c_proj = self.blocks[layer].attn.c_proj
        return z @ _param(c_proj, "weight") + _param(c_proj, "bias")

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer].mlp(h.to(self.lm.dtype)).float()


def _param(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, name)).float()


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = cast(torch.Tensor, module.weight).float()
    bias = getattr(module, "bias", None)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.float())


ADAPTERS: dict[str, type[Adapter]] = {"llama": LlamaAdapter, "gpt2": GPT2Adapter}
"""Family name -> its written-out forward."""


def adapter_for(lm: LoadedModel) -> Adapter:
    """The family's adapter, or a ValueError naming the supported families."""
    cls = ADAPTERS.get(lm.family.name)
    if cls is None:
        raise ValueError(f"attribution graphs are not implemented for the {lm.family.name} family (supported: "
                         f"{', '.join(sorted(ADAPTERS))})")
    return cls(lm)


@dataclass(frozen=True)
class Recorded:
    """What the real forward of one prompt fixes: the frozen scales and patterns, and each MLP's input and output."""

    ids: torch.Tensor
    """``[pos]`` token ids."""
    embed: torch.Tensor
    """``[pos, d]``: the token nodes' vectors (the stream entering block 0)."""
    scales1: list[torch.Tensor]
    """Per layer ``[pos, 1]``: the pre-attention norm's scale."""
    scales2: list[torch.Tensor]
    """Per layer ``[pos, 1]``: the pre-MLP norm's scale."""
    patterns: list[torch.Tensor]
    """Per layer ``[heads, dest, src]``."""
    final_scale: torch.Tensor
    mlp_in: list[torch.Tensor]
    """Per layer ``[pos, d]``: the MLP's (normalised) input, what a transcoder reads."""
    mlp_out: list[torch.Tensor]
    """Per layer ``[pos, d]``: the MLP's true output."""
    final: torch.Tensor
    """``[pos, d]``: the final norm's output (logits = final @ W_U.T)."""


@torch.no_grad()
def record(adapter: Adapter, ids: torch.Tensor) -> Recorded:
    """The real forward of ``ids [pos]``, written out, keeping what the local replacement model freezes."""
    adapter.check(int(ids.shape[0]))
    x = adapter.embed(ids.to(adapter.lm.device))
    embed = x.clone()
    s1: list[torch.Tensor] = []
    s2: list[torch.Tensor] = []
    patterns: list[torch.Tensor] = []
    mlp_in: list[torch.Tensor] = []
    mlp_out: list[torch.Tensor] = []
    for layer in range(len(adapter.blocks)):
        ln1, ln2 = adapter.norms(layer)
        s1.append(ln1.scale(x))
        a = ln1(x, s1[-1])
        patterns.append(adapter.pattern(layer, a))
        x = x + adapter.attention(layer, a, patterns[-1])
        s2.append(ln2.scale(x))
        h = ln2(x, s2[-1])
        mlp_in.append(h)
        mlp_out.append(adapter.mlp(layer, h))
        x = x + mlp_out[-1]
    final_norm = adapter.final_norm()
    final_scale = final_norm.scale(x)
    return Recorded(ids.cpu(), embed, s1, s2, patterns, final_scale, mlp_in, mlp_out, final_norm(x, final_scale))


def frozen_forward(adapter: Adapter, rec: Recorded, embed: torch.Tensor, writes: list[torch.Tensor],
                   skips: dict[int, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The local replacement model's stream: (each layer's MLP input ``h_L``, the final norm's output), linear in
    ``embed [pos, d]`` and ``writes`` (per layer ``[pos, d]``: what replaces the MLP's output) given ``rec``'s frozen
    scales and patterns; ``skips[L] [d_out, d_in]`` adds a skip transcoder's linear path ``h_L @ W_skip.T``."""
    x = embed
    hs: list[torch.Tensor] = []
    for layer in range(len(adapter.blocks)):
        ln1, ln2 = adapter.norms(layer)
        x = x + adapter.attention(layer, ln1(x, rec.scales1[layer]), rec.patterns[layer])
        h = ln2(x, rec.scales2[layer])
        hs.append(h)
        x = x + writes[layer]
        if skips and layer in skips:
            x = x + h @ skips[layer].T
    return hs, adapter.final_norm()(x, rec.final_scale)


@torch.no_grad()
def intervened_logits(adapter: Adapter, rec: Recorded, mlp_deltas: dict[int, torch.Tensor], *,
                      freeze_attention: bool) -> torch.Tensor:
    """``[pos, vocab]`` logits of the real model with ``mlp_deltas[L] [pos, d]`` added to layer L's MLP output (norms
    and MLPs free to respond); with ``freeze_attention`` every attention pattern is the one ``rec``'s forward had."""
    x = rec.embed
    for layer in range(len(adapter.blocks)):
        ln1, ln2 = adapter.norms(layer)
        a = ln1(x, ln1.scale(x))
        pattern = rec.patterns[layer] if freeze_attention else adapter.pattern(layer, a)
        x = x + adapter.attention(layer, a, pattern)
        x = x + adapter.mlp(layer, ln2(x, ln2.scale(x)))
        if layer in mlp_deltas:
            x = x + mlp_deltas[layer]
    final_norm = adapter.final_norm()
    return final_norm(x, final_norm.scale(x)) @ adapter.lm.unembed_matrix().float().T
