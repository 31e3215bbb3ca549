"""Which heads and which source tokens make a latent of an attention-output SAE fire (Kissane et al., 2024).

An SAE on ``blocks.L.attn.hook_z`` reads ``z``, every head's output before the output projection. With a linear
encoder (``SAE.encoder_affine``: ``W``, ``b``), latent ``i``'s pre-activation at a destination token ``d`` is

    pre_i = s * z[d] . W[:, i] - a * b_dec . W[:, i] + b[i]

(``s``: the token's ``constant_norm_rescale`` factor ``sqrt(d_in) / ||z[d]||``, else 1; ``a``: whether
``apply_b_dec_to_input``), and head ``h``'s block of ``z[d]`` is ``sum_s A_h[d, s] v_kv(h)[s]``. So

    pre_i - bias_i = s * sum_h sum_s A_h[d, s] * (v_kv(h)[s] . W[h-block, i]),   bias_i = b[i] - a * b_dec . W[:, i]

splits the pre-activation exactly over (head, source token): direct feature attribution (DFA). ``s`` is a fact
of the destination token, so it scales every contribution alike. Per-token ``layer_norm`` input normalisation
and matching pursuit have no such split and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..model.attention import AttentionCapture, capture_attention
from ..model.families import parse_hook_name
from ..model.loading import LoadedModel
from ..saes import SAE, EncoderAffine
from .interventions import check_sae_fits

_PAIR_CHUNK = 1024
"""Pairs of one context projected onto its values at once in ``dfa_pairs`` (memory: chunk x heads x pos floats)."""
_WIDTH_GROUPS = 4
"""``dfa_compact`` splits a context's pairs into this many groups by destination, each computed over the sources up
to its last destination (about 3/8 less work than every pair over the whole context)."""


def linear_encoder(sae: SAE) -> EncoderAffine:
    """``SAE.encoder_affine`` in float32, or a ValueError when the SAE's pre-activations are not linear in its input."""
    if sae.cfg.normalize_activations == "layer_norm":
        raise ValueError(
            "attribution needs a linear encoder: this SAE normalises each token's input by its own mean and standard "
            "deviation (normalize_activations='layer_norm'), so its pre-activations do not split over heads and sources"
        )
    W, b = sae.encoder_affine()  # a ValueError for matching pursuit
    return EncoderAffine(W.float(), b.float())


def _check_heads(sae: SAE, n_heads: int) -> int:
    """``d_head`` of an SAE on ``n_heads`` heads."""
    head = sae.cfg.hook_head_index
    if head is not None:
        if not 0 <= head < n_heads:
            raise ValueError(f"hook_head_index={head} is out of range for {n_heads} heads")
        return sae.cfg.d_in
    if sae.cfg.d_in % n_heads:
        raise ValueError(f"d_in={sae.cfg.d_in} does not split into {n_heads} heads: is this an attn.hook_z SAE?")
    return sae.cfg.d_in // n_heads


def _per_head(sae: SAE, rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Vectors in SAE-input space ``rows [L, d_in]`` as ``[L, n_heads, d_head]`` blocks over the hook's heads (zero
    off a one-head SAE's head)."""
    d_head = _check_heads(sae, n_heads)
    head = sae.cfg.hook_head_index
    if head is None:
        return rows.reshape(len(rows), n_heads, d_head)
    out = rows.new_zeros(len(rows), n_heads, d_head)
    out[:, head] = rows
    return out


def _scale(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The per-token input factor ``[...]`` (constant_norm_rescale's ``sqrt(d_in) / ||x||``, else 1) of SAE inputs
    ``x [..., d_in]``."""
    if sae.cfg.normalize_activations == "constant_norm_rescale":
        return sae.cfg.d_in**0.5 / x.norm(dim=-1)
    return x.new_ones(x.shape[:-1])


def _b_dec(sae: SAE) -> torch.Tensor:
    """What ``process_in`` subtracts after normalising: ``b_dec`` or nothing, ``[d_in]`` float32."""
    b_dec = sae.b_dec.float()
    return b_dec if sae.cfg.apply_b_dec_to_input else torch.zeros_like(b_dec)


def head_weight_shares(sae: SAE, n_heads: int) -> torch.Tensor:
    """``[d_sae, n_heads]``: each latent's share of ``||W_dec[i]||^2`` in each head's block (rows sum to 1; zero rows
    for all-zero decoder rows; a one-head SAE's latents are all in its head)."""
    W = sae.W_dec.detach().float()
    blocks = _per_head(sae, W, n_heads)  # [d_sae, n_heads, d_head]
    energy = blocks.pow(2).sum(-1)
    total = energy.sum(-1, keepdim=True)
    return torch.where(total > 0, energy / total.clamp_min(torch.finfo(energy.dtype).tiny), 0.0)


def head_decomposition(sae: SAE, z: torch.Tensor, latents: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """``[..., n_latents, n_heads]``: latent pre-activations minus ``b`` split over heads, from ``hook_z`` activations
    ``z [..., n_heads, d_head]``: ``(s * z_h - a * b_dec_h) . W[h-block, i]`` (sums over heads to ``pre - b``)."""
    W, _ = linear_encoder(sae)
    enc = W.T if latents is None else W.T[torch.as_tensor(latents, dtype=torch.long, device=W.device)]
    z = z.to(W.device, torch.float32)
    n_heads = z.shape[-2]
    blocks = _per_head(sae, enc, n_heads)  # [L, n_heads, d_head]
    sae_in = _sae_in_by_head(sae, z.reshape(-1, n_heads, z.shape[-1])).view(z.shape)
    return torch.einsum("...he,lhe->...lh", sae_in, blocks)


def _sae_in_by_head(sae: SAE, z: torch.Tensor) -> torch.Tensor:
    """``s * z - a * b_dec`` per head, ``[N, n_heads, d_head]`` float32, for ``hook_z`` rows ``z [N, n_heads, d_head]``
    (the SAE's input where it reads; a one-head SAE's other heads carry ``s * z`` and meet zero encoder blocks)."""
    x = sae.select_input(z)
    s = _scale(sae, x.flatten(-2) if sae.cfg.hook_head_index is None else x)
    return s[:, None, None] * z - _per_head(sae, _b_dec(sae)[None], z.shape[-2])[0]


def _pairs(tokens, latents, n_tokens: int, d_sae: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    latents = torch.as_tensor(latents, dtype=torch.long, device=device)
    if tokens.ndim != 1 or tokens.shape != latents.shape:
        raise ValueError(f"tokens and latents must be 1-D of one length, got {tuple(tokens.shape)}, {tuple(latents.shape)}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= n_tokens or latents.min() < 0 or latents.max() >= d_sae):
        raise ValueError(f"token ids must lie in [0, {n_tokens}) and latent ids in [0, {d_sae})")
    return tokens, latents


def pair_head_terms(
    sae: SAE, z: torch.Tensor, tokens: torch.Tensor | list[int], latents: torch.Tensor | list[int]
) -> torch.Tensor:
    """``[P, n_heads]``: ``head_decomposition`` of latent ``latents[p]`` at token ``tokens[p]`` of ``z [N, n_heads,
    d_head]`` (a few pairs, e.g. a latent's top examples; for every firing pair of a batch use ``head_term_sums``)."""
    W, _ = linear_encoder(sae)
    z = z.to(W.device, torch.float32)
    if z.ndim != 3:
        raise ValueError(f"z must be [N, n_heads, d_head], got {tuple(z.shape)}")
    tokens, latents = _pairs(tokens, latents, len(z), sae.cfg.d_sae, W.device)
    sae_in, enc = _sae_in_by_head(sae, z), W.T
    out = z.new_empty(len(tokens), z.shape[1])
    for pick in torch.arange(len(tokens), device=W.device).split(_PAIR_CHUNK):  # gathers that stay in cache
        out[pick] = (sae_in[tokens[pick]] * _per_head(sae, enc[latents[pick]], z.shape[1])).sum(-1)
    return out


def head_term_sums(
    sae: SAE,
    z: torch.Tensor,
    tokens: torch.Tensor | list[int],
    latents: torch.Tensor | list[int],
    weights: torch.Tensor | list[float] | None = None,
) -> torch.Tensor:
    """``[d_sae, n_heads]``: per latent, ``sum_p weights[p] * head_decomposition`` over the (token, latent) pairs that
    name it (weights default to 1: divide by fire counts for the mean per head over firing tokens).

    One sparse matmul, ``pairs^T @ sae_in``, then one product with the encoder: the streaming form for precompute,
    e.g. with ``SparseCodes``' (token, latent, value) of a batch.
    """
    W, _ = linear_encoder(sae)
    z = z.to(W.device, torch.float32)
    if z.ndim != 3:
        raise ValueError(f"z must be [N, n_heads, d_head], got {tuple(z.shape)}")
    n_tokens, n_heads = z.shape[:2]
    tokens, latents = _pairs(tokens, latents, n_tokens, sae.cfg.d_sae, W.device)
    w = torch.ones(len(tokens), device=W.device) if weights is None else torch.as_tensor(weights, device=W.device)
    pairs = torch.sparse_coo_tensor(
        torch.stack([latents, tokens]), w.float(), (sae.cfg.d_sae, n_tokens), check_invariants=False
    )
    summed = torch.sparse.mm(pairs, _sae_in_by_head(sae, z).flatten(1))  # [d_sae, n_heads * d_head]
    return (summed.view(sae.cfg.d_sae, n_heads, -1) * _per_head(sae, W.T, n_heads)).sum(-1)


class PairDFA(NamedTuple):
    """DFA of P (context, latent, destination) triples."""

    contributions: torch.Tensor
    """``[P, n_heads, pos]`` float32: ``s * A_h[d, src] * (v_kv(h)[src] . W[h-block, i])``; zero after the destination."""
    pre: torch.Tensor
    """``[P]``: the latent's pre-activation at the destination (the quantity that decides firing, see
    ``SAE.encoder_affine``), computed from ``z`` directly."""
    bias: torch.Tensor
    """``[P]``: ``b[i] - a * b_dec . W[:, i]``, so that ``pre = contributions.sum((1, 2)) + bias``."""


def dfa_pairs(
    sae: SAE,
    capture: AttentionCapture,
    latents: torch.Tensor | list[int],
    positions: torch.Tensor | list[int],
    rows: torch.Tensor | list[int] | None = None,
) -> PairDFA:
    """DFA for many (latent, destination) pairs from one capture; ``rows`` picks each pair's context (default 0)."""
    W, b = linear_encoder(sae)
    dev = W.device
    latents = torch.as_tensor(latents, dtype=torch.long, device=dev)
    positions = torch.as_tensor(positions, dtype=torch.long, device=dev)
    rows = torch.zeros_like(latents) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev)
    if not latents.shape == positions.shape == rows.shape or latents.ndim != 1:
        raise ValueError(
            f"latents, positions and rows must be 1-D of one length, got {tuple(latents.shape)}, "
            f"{tuple(positions.shape)}, {tuple(rows.shape)}"
        )
    if len(latents) and (latents.min() < 0 or latents.max() >= sae.cfg.d_sae):
        raise ValueError(f"latent ids out of range for d_sae={sae.cfg.d_sae}")
    z, pattern, values = (t.to(dev, torch.float32) for t in (capture.z, capture.pattern, capture.values))
    n_batch, n_pos, n_heads, _ = z.shape
    if len(positions) and (positions.min() < 0 or positions.max() >= n_pos or rows.min() < 0 or rows.max() >= n_batch):
        raise ValueError(f"positions must lie in [0, {n_pos}) and rows in [0, {n_batch})")
    x = sae.select_input(z[rows, positions])  # [P, d_in] or [P, n_heads, d_head]
    x = x if sae.cfg.hook_head_index is not None else x.flatten(-2)
    scale = _scale(sae, x)
    enc = W.T.contiguous()  # latents' encoder rows [d_sae, d_in]: gathered per pair below
    rows_enc = enc[latents]
    bias = b[latents] - rows_enc @ _b_dec(sae)
    pre = scale * (x * rows_enc).sum(-1) + bias

    contributions = z.new_empty(len(latents), n_heads, n_pos)
    for row in rows.unique().tolist():  # per context: one matmul per head over its pairs
        by_head = values[row].permute(1, 2, 0)  # [n_heads, d_head, src]
        for pick in (rows == row).nonzero().squeeze(1).split(_PAIR_CHUNK):
            blocks = _per_head(sae, rows_enc[pick], n_heads).transpose(0, 1)  # [n_heads, p, d_head]
            projected = torch.bmm(blocks, by_head)  # [n_heads, p, src]: v_kv(h)[src] . W[h-block, i]
            projected *= pattern[row].index_select(1, positions[pick])
            contributions[pick] = projected.transpose(0, 1) * scale[pick, None, None]
    return PairDFA(contributions, pre, bias)


@dataclass(frozen=True)
class DFA:
    """Direct feature attribution of one latent at one destination token of a prompt."""

    latent: int
    position: int
    contributions: torch.Tensor
    """``[n_heads, position + 1]`` float32 on the CPU: each (head, source token)'s part of ``pre - bias``."""
    pre: float
    """The latent's pre-activation at the destination."""
    bias: float
    """The part of ``pre`` no source contributes: ``b[i] - a * b_dec . W[:, i]``."""
    activation: float
    """The latent's code at the destination."""

    def by_head(self) -> torch.Tensor:
        """``[n_heads]``: contributions summed over sources."""
        return self.contributions.sum(-1)

    def by_source(self) -> torch.Tensor:
        """``[position + 1]``: contributions summed over heads."""
        return self.contributions.sum(0)


def attention_layer(lm: LoadedModel, sae: SAE) -> int:
    """The layer of an ``attn.hook_z`` SAE, after checking it fits the model; a ValueError for other hooks."""
    hook = check_sae_fits(lm, sae)
    layer, kind = parse_hook_name(hook)
    if kind != "attn.hook_z":
        raise ValueError(f"attribution to heads and source tokens needs an attn.hook_z SAE; this SAE reads {hook}")
    return layer


@torch.inference_mode()
def dfa(lm: LoadedModel, sae: SAE, token_ids: list[int] | torch.Tensor, latent: int, position: int) -> DFA:
    """DFA of ``latent`` at ``position`` of a prompt: one forward up to the SAE's layer, two re-runs of its attention."""
    layer = attention_layer(lm, sae)
    linear_encoder(sae)  # refuse before the forward
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.ndim != 1 or not 0 <= position < len(ids):
        raise ValueError(f"position {position} is outside the prompt's {len(ids)} tokens")
    if position >= lm.max_context:
        raise ValueError(f"position {position} is past the model's context of {lm.max_context} tokens")
    capture = capture_attention(lm, layer, ids[: position + 1])  # later tokens cannot matter (causal attention)
    return dfa_from_capture(sae, capture, latent, position)


def dfa_from_capture(sae: SAE, capture: AttentionCapture, latent: int, position: int, row: int = 0) -> DFA:
    """``dfa`` from an ``AttentionCapture`` already taken (e.g. one per prompt, reused across latents and positions)."""
    out = dfa_pairs(sae, capture, [latent], [position], [row])
    x = sae.select_input(capture.z[row, position].to(sae.device))
    activation = float(sae.encode(x)[latent])
    return DFA(latent, position, out.contributions[0, :, : position + 1].cpu(), float(out.pre[0]), float(out.bias[0]),
               activation)


class LatentReadout(NamedTuple):
    """Every latent's encoder row and constant, float32, prepared once for many ``dfa_compact`` calls."""

    rows: torch.Tensor
    """``[d_sae, d_in]``: ``W[:, i]`` as rows."""
    bias: torch.Tensor
    """``[d_sae]``: ``b[i] - a * b_dec . W[:, i]``, the part of ``pre`` no source contributes."""


def latent_readout(sae: SAE, device: torch.device | str | None = None) -> LatentReadout:
    """``LatentReadout`` of a linear-encoder SAE (a ValueError otherwise), on ``device`` (default the SAE's)."""
    W, b = linear_encoder(sae)
    rows = W.T.contiguous()
    bias = b - rows @ _b_dec(sae)
    return LatentReadout(rows.to(device or W.device), bias.to(device or W.device))


class CompactDFA(NamedTuple):
    """DFA of P (context, latent, destination) pairs kept as each pair's ``n`` largest (head, source) contributions
    by magnitude, the sum of the others, and the per-head totals: ``value.sum(1) + rest + bias == pre``."""

    head: torch.Tensor
    """``[P, n]`` int64, -1 where fewer than ``n`` (head, source) pairs contribute (sources after the destination, and
    heads a one-head SAE does not read, contribute exactly 0 and are left out)."""
    source: torch.Tensor
    """``[P, n]`` int64 source positions (-1 likewise)."""
    value: torch.Tensor
    """``[P, n]`` float32 contributions, largest magnitude first (0 where padded)."""
    rest: torch.Tensor
    """``[P]``: the sum of every other (head, source) contribution."""
    by_head: torch.Tensor
    """``[P, n_heads]``: contributions summed over all sources (sums to ``pre - bias``)."""
    pre: torch.Tensor
    """``[P]``: the pre-activation, computed from ``z`` directly."""
    bias: torch.Tensor
    """``[P]``: ``b[i] - a * b_dec . W[:, i]``."""


def dfa_compact(
    sae: SAE,
    capture: AttentionCapture,
    latents: torch.Tensor | list[int],
    positions: torch.Tensor | list[int],
    rows: torch.Tensor | list[int],
    n_top: int,
    readout: LatentReadout | None = None,
) -> CompactDFA:
    """``dfa_pairs`` reduced on the fly to ``CompactDFA`` (no ``[P, n_heads, pos]`` output): the streaming form for
    precompute's top examples. ``readout`` (``latent_readout``) saves re-deriving the encoder on every call."""
    readout = readout if readout is not None else latent_readout(sae)
    dev = readout.rows.device
    latents, positions, rows = (torch.as_tensor(t, dtype=torch.long, device=dev) for t in (latents, positions, rows))
    if not latents.shape == positions.shape == rows.shape or latents.ndim != 1:
        raise ValueError(
            f"latents, positions and rows must be 1-D of one length, got {tuple(latents.shape)}, "
            f"{tuple(positions.shape)}, {tuple(rows.shape)}"
        )
    z, pattern, values = (t.to(dev, torch.float32) for t in (capture.z, capture.pattern, capture.values))
    n_batch, n_pos, n_heads, _ = z.shape
    if len(latents) and (latents.min() < 0 or latents.max() >= sae.cfg.d_sae):
        raise ValueError(f"latent ids out of range for d_sae={sae.cfg.d_sae}")
    if len(positions) and (positions.min() < 0 or positions.max() >= n_pos or rows.min() < 0 or rows.max() >= n_batch):
        raise ValueError(f"positions must lie in [0, {n_pos}) and rows in [0, {n_batch})")
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}")
    n = min(n_top, n_heads * n_pos)
    x = sae.select_input(z[rows, positions])
    x = x if sae.cfg.hook_head_index is not None else x.flatten(-2)
    scale = _scale(sae, x)
    rows_enc, bias = readout.rows[latents], readout.bias[latents]
    pre = scale * (x * rows_enc).sum(-1) + bias

    P = len(latents)
    head = torch.full((P, n), -1, dtype=torch.long, device=dev)
    source = torch.full((P, n), -1, dtype=torch.long, device=dev)
    value = torch.zeros(P, n, device=dev)
    rest = torch.zeros(P, device=dev)
    by_head = torch.zeros(P, n_heads, device=dev)
    for row in rows.unique().tolist():
        # pairs by destination, in a few groups, each computed over the sources up to its last destination only
        picks = (rows == row).nonzero().squeeze(1)
        picks = picks[positions[picks].argsort()]
        for pick in picks.split(min(_PAIR_CHUNK, -(-len(picks) // _WIDTH_GROUPS))):
            width = int(positions[pick].max()) + 1
            by_src = values[row, :width].permute(1, 2, 0)  # [n_heads, d_head, src]
            blocks = _per_head(sae, rows_enc[pick], n_heads).transpose(0, 1)  # [n_heads, p, d_head]
            projected = torch.bmm(blocks, by_src)  # [n_heads, p, src]
            projected *= pattern[row, :, :, :width].index_select(1, positions[pick])
            terms = projected.transpose(0, 1) * scale[pick, None, None]  # [p, n_heads, src]
            by_head[pick] = terms.sum(-1)
            flat = terms.flatten(1)
            # exact zeros (sources after the destination: the pattern is 0 there; heads a one-head SAE does not
            # read) rank below every other term and are never kept
            top = flat.abs().topk(min(n, flat.shape[1]), dim=1).indices
            kept = flat.gather(1, top)
            real = kept != 0
            value[pick, : top.shape[1]] = kept
            head[pick, : top.shape[1]] = torch.where(real, top // width, -1)
            source[pick, : top.shape[1]] = torch.where(real, top % width, -1)
            rest[pick] = flat.sum(1) - kept.sum(1)
    return CompactDFA(head, source, value, rest, by_head, pre, bias)
