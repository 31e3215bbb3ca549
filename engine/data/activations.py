"""Streaming a model's activations at one hook point over packed contexts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..model.attention import AttentionCapture, capture_attention
from ..model.families import parse_hook_name
from ..model.loading import LoadedModel

MASSIVE_FACTOR = 10.0
"""A token whose activation norm exceeds this multiple of the batch's median counts as a massive activation
(an attention sink like position 0, e.g. norm ~26,000 vs ~170 on SmolLM2 layer 15) and is excluded by default."""


@dataclass(frozen=True)
class ActivationBatch:
    """One batch of contexts and the activations at a hook point."""

    token_ids: torch.Tensor
    """``[batch, pos]`` int64 on the CPU."""
    acts: torch.Tensor
    """``[batch, pos, width]`` in the model's dtype, on the model's device (hook_z heads flattened, or one head)."""
    mask: torch.Tensor
    """``[batch, pos]`` bool on the model's device: tokens that count for statistics and training."""
    attention: AttentionCapture | None = None
    """The hook's layer's attention pattern and values (``attention=True`` on an ``attn.hook_z`` hook), else None."""
    massive: torch.Tensor | None = None
    """``[batch, pos]`` bool on the model's device: the massive-activation tokens (``massive_tokens``) among those
    position 0 and special tokens leave, whether ``mask`` excludes them (the default) or not."""
    grads: torch.Tensor | None = None
    """``[batch, pos, width]`` float32: the next-token loss gradient at the hook (``gradients.iter_gradients``, what a
    g-SAE selects with), else None."""
    targets: torch.Tensor | None = None
    """``[batch, pos, width_out]``: the activations at a second, later hook from the same forward (``target_hook``: a
    transcoder's output hook, what it predicts), else None."""


def stats_mask(
    token_ids: torch.Tensor, special_ids: Iterable[int], *, include_special: bool = False, include_first: bool = False
) -> torch.Tensor:
    """Tokens that statistics include: position 0 (attention sink) and special tokens excluded by default."""
    mask = torch.ones_like(token_ids, dtype=torch.bool)
    if not include_first:
        mask[:, 0] = False
    specials = list(special_ids)
    if not include_special and specials:
        mask &= ~torch.isin(token_ids, torch.tensor(specials, dtype=token_ids.dtype))
    return mask


def massive_tokens(acts: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Which ``counted [batch, pos]`` tokens of ``acts [batch, pos, width]`` are massive: activation norm not below
    ``MASSIVE_FACTOR`` x the median norm of the batch's counted tokens."""
    if not counted.any():
        return torch.zeros_like(counted)
    norms = acts.float().norm(dim=-1)
    return counted & ~(norms < MASSIVE_FACTOR * norms[counted].median())


def batched(contexts: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Group contexts into ``[batch, pos]`` tensors (the last batch may be smaller)."""
    rows: list[list[int]] = []
    for ctx in contexts:
        rows.append(ctx)
        if len(rows) == batch_size:
            yield torch.tensor(rows, dtype=torch.long)
            rows = []
    if rows:
        yield torch.tensor(rows, dtype=torch.long)


def iter_activations(
    lm: LoadedModel,
    hook_name: str,
    contexts: Iterable[list[int]],
    batch_size: int,
    *,
    include_special: bool = False,
    include_first: bool = False,
    include_massive: bool = False,
    head_index: int | None = None,
    attention: bool = False,
    target_hook: str | None = None,
) -> Iterator[ActivationBatch]:
    """Run the model up to ``hook_name`` (stopping there) on batches of contexts.

    The mask drops position 0, special tokens and massive-activation tokens unless told to keep them.
    ``head_index`` keeps one head of a per-head hook (an SAE's ``hook_head_index``) instead of all heads flattened.
    ``attention`` (an ``attn.hook_z`` hook only) also captures the layer's attention pattern and values
    (``capture_attention``: the same forward plus two re-runs of the attention module), for head attribution.
    ``target_hook`` (a transcoder's output hook) is captured in the same forward, which then stops after it.
    """
    point = lm.hooks.check(hook_name)
    if target_hook is not None and (attention or head_index is not None):
        raise ValueError("a second (target) hook is not captured together with attention or one head")
    if head_index is not None and not 0 <= head_index < point.n_heads:
        raise ValueError(
            f"head_index={head_index} needs a per-head hook point with more heads; {hook_name} has {point.n_heads or 'no'} heads"
        )
    layer, kind = parse_hook_name(hook_name) if attention else (0, "")
    if attention and kind != "attn.hook_z":
        raise ValueError(f"attention patterns come with attn.hook_z hooks only, not {hook_name}")
    for token_ids in batched(contexts, batch_size):
        capture: AttentionCapture | None = None
        targets: torch.Tensor | None = None
        if attention:
            capture = capture_attention(lm, layer, token_ids)
            acts = capture.z.to(lm.dtype)  # the hook's own values (captured exactly, as float32)
        elif target_hook is not None:
            both = lm.capture(token_ids, [hook_name, target_hook])
            acts, targets = both[hook_name], both[target_hook]
        else:
            acts = lm.capture(token_ids, hook_name)[hook_name]
        if head_index is not None:
            acts = acts[..., head_index, :]
        elif acts.ndim == 4:
            acts = acts.flatten(-2)
        mask = stats_mask(token_ids, lm.special_token_ids, include_special=include_special, include_first=include_first)
        mask = mask.to(acts.device)
        massive = massive_tokens(acts, mask)
        if not include_massive:
            mask &= ~massive
        yield ActivationBatch(token_ids, acts, mask, capture, massive, targets=targets)
