"""Steering or ablating a graph's feature nodes (issue 25 item 5): each chosen node's write ``a W_dec[latent]`` at its
layer and position set to ``multiplier * a W_dec[latent]`` (0 ablates, 1 changes nothing), at the prompt's positions
only; then the next token's logits and a greedy continuation, in two models side by side:

* **attention frozen**: the local replacement model of ``frozen.py`` at the prompt's positions. Attention patterns
  and norm scales are the clean run's, and every MLP writes what it wrote in the clean run (transcoder features plus
  the error node: the other nodes are held) plus the intervention, plus a skip transcoder's linear path. This is
  the model the graph's edges describe, so the change of a target logit is exactly ``sum (m - 1) A[target, node]``.
  Generated tokens (positions after the prompt) run through the real model: their attention is computed, and reads
  the prompt positions' intervened stream.
* **attention free**: the real model with ``(m - 1) a W_dec[latent]`` added to its MLP's output at the node's
  position; attention, norms and every later MLP respond.

Both run saescope's written-out forward (``frozen.Adapter``); each generated token runs only its own position, its
attention reading the earlier positions' normalised inputs kept from the previous passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.loading import LoadedModel
from ..saes.transcoders import Transcoder
from .attribution import Setup, setup
from .frozen import Adapter
from .supernodes import Supernode

MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Steer:
    """One feature node set to a multiple of its clean activation."""

    node_id: str
    """``{layer}_{latent}_{position}`` as in the graph JSON."""
    multiplier: float

    @property
    def address(self) -> tuple[int, int, int]:
        """(layer, position, latent) of the node, or a ValueError for an id that is not a feature node's."""
        parts = self.node_id.split("_")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{self.node_id!r} is not a feature node (feature ids are LAYER_LATENT_POSITION)")
        layer, latent, pos = (int(p) for p in parts)
        return layer, pos, latent


@dataclass(frozen=True)
class Outcome:
    """What one model does after the prompt."""

    logits: torch.Tensor
    """``[vocab]``: the next token's logits after the prompt."""
    continuation: list[int]
    """Greedily generated token ids (stopping early at the end-of-text token)."""


@dataclass(frozen=True)
class Steered:
    clean: Outcome
    """The real model, untouched."""
    free: Outcome
    """The real model with the intervention (attention free)."""
    frozen: Outcome | None
    """The local replacement model with the intervention (attention frozen); None when not asked for."""


def mlp_deltas(s: Setup, transcoders: dict[int, Transcoder], steers: list[Steer]) -> dict[int, torch.Tensor]:
    """Layer -> ``[prompt_pos, d]``: what the steers add to each MLP's output (``(m - 1) a W_dec[latent]``)."""
    index = {tuple(f): i for i, f in enumerate(s.features.tolist())}
    deltas: dict[int, torch.Tensor] = {}
    for steer in steers:
        layer, pos, latent = steer.address
        i = index.get((layer, pos, latent))
        if i is None:
            raise ValueError(f"feature node {steer.node_id} is not active on this prompt (layer {layer}, position "
                             f"{pos}, latent {latent})")
        delta = deltas.setdefault(layer, torch.zeros_like(s.rec.embed))
        write = float(s.activations[i]) * transcoders[layer].W_dec[latent].float().to(delta.device)
        delta[pos] += (steer.multiplier - 1.0) * write
    return deltas


def forward(adapter: Adapter, ids: torch.Tensor, deltas: dict[int, torch.Tensor], frozen: Setup | None,
            cache: list[torch.Tensor]) -> torch.Tensor:
    """``[new, vocab]`` logits of the positions of ``ids [n]`` (the prompt, then generated tokens) not yet in
    ``cache`` (per layer, the attention's normalised input ``[seen, d]`` at the positions seen so far; extended in
    place), with ``deltas[L] [prompt_pos, d]`` added to layer L's MLP output at the prompt's positions; with
    ``frozen`` the prompt's positions run the local replacement model of that setup (see the module docstring).
    Earlier positions never read later ones, so each generated token needs only its own row."""
    start = int(cache[0].shape[0]) if cache else 0
    x = adapter.embed(ids.to(adapter.lm.device))[start:]
    rec = None if frozen is None else frozen.rec
    k = 0 if rec is None else max(0, min(int(rec.embed.shape[0]), len(ids)) - start)  # frozen rows of this pass
    if k and start:
        raise ValueError("the prompt's positions must run in the first pass")
    for layer in range(len(adapter.blocks)):
        ln1, ln2 = adapter.norms(layer)
        s1 = ln1.scale(x)
        if rec is not None and k:
            s1[:k] = rec.scales1[layer][:k]
        a = ln1(x, s1)
        a_all = torch.cat([cache[layer], a]) if start else a
        if len(cache) <= layer:
            cache.append(a_all)
        else:
            cache[layer] = a_all
        pattern = adapter.pattern(layer, a_all)[:, start:]  # [heads, new, n]
        if rec is not None and k:
            pattern[:, :k, :k] = rec.patterns[layer][:, :k, :k]
        x = x + adapter.attention(layer, a_all, pattern)
        s2 = ln2.scale(x)
        if rec is not None and k:
            s2[:k] = rec.scales2[layer][:k]
        h = ln2(x, s2)
        out = adapter.mlp(layer, h)
        if k and frozen is not None:
            held = frozen.writes[layer][:k]
            if layer in frozen.skips:
                held = held + h[:k] @ frozen.skips[layer].T
            out = torch.cat([held, out[k:]])
        if layer in deltas and start < len(deltas[layer]):
            delta = deltas[layer][start:]
            out = torch.cat([out[:len(delta)] + delta, out[len(delta):]])
        x = x + out
    final_norm = adapter.final_norm()
    scale = final_norm.scale(x)
    if rec is not None and k:
        scale[:k] = rec.final_scale[:k]
    return final_norm(x, scale) @ adapter.lm.unembed_matrix().float().T


@torch.no_grad()
def generate(adapter: Adapter, prompt: torch.Tensor, deltas: dict[int, torch.Tensor], frozen: Setup | None,
             new_tokens: int) -> Outcome:
    """The next token's logits after ``prompt [pos]`` and a greedy continuation of ``new_tokens`` tokens."""
    eos = getattr(adapter.lm.tokenizer, "eos_token_id", None)
    cache: list[torch.Tensor] = []
    ids = prompt.clone()
    first = forward(adapter, ids, deltas, frozen, cache)[-1].cpu()
    logits = first
    out: list[int] = []
    for step in range(new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token == eos or step == new_tokens - 1:
            break
        ids = torch.cat([ids, torch.tensor([token])])
        logits = forward(adapter, ids, deltas, frozen, cache)[-1].cpu()
    return Outcome(first, out)


@torch.no_grad()
def steer(lm: LoadedModel, transcoders: dict[int, Transcoder], ids: list[int], steers: list[Steer], *,
          new_tokens: int = 12, freeze_attention: bool = True) -> Steered:
    """Apply ``steers`` to the prompt ``ids`` and continue it, clean, with attention free, and (if asked) frozen."""
    if not steers:
        raise ValueError("pin at least one feature node (or supernode) to steer")
    if not 0 <= new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"new_tokens must be in 0..{MAX_NEW_TOKENS}, got {new_tokens}")
    for item in steers:
        layer = item.address[0]
        if layer not in transcoders:
            raise ValueError(f"no transcoder for layer {layer} (node {item.node_id})")
    prompt = torch.tensor(ids, dtype=torch.long)
    s = setup(lm, transcoders, prompt)
    deltas = mlp_deltas(s, transcoders, steers)
    return Steered(clean=generate(s.adapter, prompt, {}, None, new_tokens),
                   free=generate(s.adapter, prompt, deltas, None, new_tokens),
                   frozen=generate(s.adapter, prompt, deltas, s, new_tokens) if freeze_attention else None)


def top_tokens(logits: torch.Tensor, k: int = 5) -> list[tuple[int, float, float]]:
    """The ``k`` most likely next tokens: (id, probability, logit)."""
    probs = logits.float().softmax(-1)
    values, idx = probs.topk(min(k, int(probs.shape[-1])))
    return [(int(i), float(p), float(logits[i])) for i, p in zip(idx.tolist(), values.tolist(), strict=True)]


def expand(multipliers: dict[str, float], groups: list[Supernode]) -> list[Steer]:
    """Steers for node ids and supernode ids (``multipliers``): a supernode steers each of its members by its
    multiplier."""
    by_id = {g.id: g for g in groups}
    steers: list[Steer] = []
    for node_id, multiplier in multipliers.items():
        group = by_id.get(node_id)
        steers += [Steer(m, multiplier) for m in group.members] if group else [Steer(node_id, multiplier)]
    return steers
