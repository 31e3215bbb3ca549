"""Per-latent facts that need no corpus pass: logit effects, decoder neighbours; and labels from examples."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..analysis.ivf import default_lists, ivf_neighbors, recall_at_n
from ..model.attention import attention_module
from ..model.families import parse_hook_name
from ..model.loading import LoadedModel
from ..model.tokens import short_token
from ..saes import SAE


class TopBottom(NamedTuple):
    """Per-row ``n`` largest and ``n`` smallest values with their column ids (numpy)."""

    top_ids: np.ndarray
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray


@torch.inference_mode()
def residual_directions(lm: LoadedModel, sae: SAE, chunk: int = 1024, latents: slice = slice(None)) -> torch.Tensor:
    """``[d_sae, d_model]``: each latent's decoder row (of ``latents``: all by default) as the residual-stream
    direction it writes. An ``attn.hook_z`` SAE writes per-head outputs before the attention's output projection, so
    its rows go through that projection (bias left out; a one-head SAE's rows fill its head's block); other SAEs'
    rows already are."""
    dirs = sae.decoder_directions().detach()[latents]
    layer, kind = parse_hook_name(sae.hook_out)  # where it writes: a transcoder's rows are MLP outputs already
    if kind != "attn.hook_z":
        return dirs
    out_proj = getattr(attention_module(lm, layer), lm.family.out_proj)
    weight = next(out_proj.parameters())
    zero = out_proj(torch.zeros(1, lm.n_heads * lm.d_head, device=weight.device, dtype=weight.dtype))
    head = sae.cfg.hook_head_index
    out = []
    for rows in dirs.split(chunk):
        if head is not None:
            full = rows.new_zeros(len(rows), lm.n_heads, lm.d_head)
            full[:, head] = rows
            rows = full.flatten(1)
        out.append((out_proj(rows.to(weight.device, weight.dtype)) - zero).float())
    return torch.cat(out)


@torch.inference_mode()
def logit_effects(lm: LoadedModel, sae: SAE, n: int = 10, chunk: int = 512, latents: slice = slice(None)) -> TopBottom:
    """Each latent's (of ``latents``: all by default) residual direction (``residual_directions``), scaled by the
    final norm's weight, through the unembedding: top/bottom ``n`` tokens."""
    W_U = lm.unembed_matrix().detach()
    dirs = residual_directions(lm, sae, latents=latents)
    if W_U.shape[1] != dirs.shape[1]:
        raise ValueError(f"logit effects need d_in == d_model ({lm.d_model}); this SAE has d_in={sae.cfg.d_in}")
    scale = lm.final_norm_scale().to(W_U.device)
    W_U = W_U.to(torch.float32 if W_U.device.type == "cpu" and W_U.dtype == torch.float16 else W_U.dtype)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    n = min(n, W_U.shape[0])
    for start in range(0, dirs.shape[0], chunk):
        rows = (dirs[start : start + chunk].to(W_U.device).float() * scale).to(W_U.dtype)
        logits = rows @ W_U.T  # ranked in the product's dtype: a float copy would hold no more information
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for store, t in zip(parts, (top.indices, top.values, bottom.indices, bottom.values), strict=True):
            store.append(t.float().cpu())
    top_ids, top_vals, bot_ids, bot_vals = (torch.cat(p).numpy() for p in parts)
    return TopBottom(top_ids.astype(np.int32), top_vals, bot_ids.astype(np.int32), bot_vals)


def latent_logit_effects(lm: LoadedModel, sae: SAE, latent: int, n: int = 10) -> TopBottom:
    """One latent's ``logit_effects`` (one product through the unembedding): what a feature page computes for a run
    that left them out (``logits_on_demand_above``)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent {latent} is out of range: this SAE has {sae.cfg.d_sae} latents")
    return logit_effects(lm, sae, n, latents=slice(latent, latent + 1))


@torch.inference_mode()
def decoder_norms(sae: SAE, chunk: int = 65_536) -> torch.Tensor:
    """``[d_sae]`` float32 norms of the decoder directions, a chunk of rows at a time (no float copy of a wide
    decoder): what ``latent_neighbors_of`` divides by, worth keeping between calls."""
    dirs = sae.decoder_directions().detach()
    return torch.cat([rows.float().norm(dim=1) for rows in dirs.split(chunk)]).clamp_min(1e-12)


@torch.inference_mode()
def latent_neighbors_of(sae: SAE, latent: int, n: int = 10, norms: torch.Tensor | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One latent's exact ``n`` nearest other latents by decoder cosine (ids, cosines; best first): what a feature
    page computes for a run that left the neighbours out (``neighbors_on_demand_above``). One product of its
    direction with the decoder, in the decoder's dtype (memory-bound: it reads the decoder once); a low-precision
    decoder's ``max(8n, 512)`` best candidates are then ranked in float32, and if the n-th of them does not clear the
    best non-candidate by ``BF16_DOT_ERROR`` every row is scored in float32, so the result is float32's either way.
    ``norms``: ``decoder_norms(sae)``, when the caller keeps them."""
    dirs = sae.decoder_directions().detach()
    d_sae = dirs.shape[0]
    if not 0 <= latent < d_sae:
        raise ValueError(f"latent {latent} is out of range: this SAE has {d_sae} latents")
    norms = decoder_norms(sae) if norms is None else norms
    n = min(n, d_sae - 1)
    query = dirs[latent].float() / norms[latent]

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return (dirs[rows].float() @ query) / norms[rows]

    scores = (dirs @ query.to(dirs.dtype)[:, None]).squeeze(1).float() / norms  # one pass over the decoder
    scores[latent] = -float("inf")  # not its own neighbour
    wide = min(max(8 * n, 512), d_sae - 1)
    if dirs.dtype == torch.float32 or wide == n:
        top = scores.topk(n)
        return top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy()
    cand = scores.topk(wide + 1) if wide < d_sae - 1 else scores.topk(wide)
    ids = cand.indices[:wide]
    cos = exact(ids)
    top = cos.topk(n)
    ids, cos = ids[top.indices], top.values
    clear = wide == d_sae - 1 or bool(cos[-1] > cand.values[wide] + BF16_DOT_ERROR)
    if not clear:  # a non-candidate might beat the n-th: score every row in float32
        everything = torch.cat([exact(rows) for rows in torch.arange(d_sae, device=dirs.device).split(65_536)])
        everything[latent] = -float("inf")
        top = everything.topk(n)
        ids, cos = top.indices, top.values
    return ids.cpu().numpy().astype(np.int32), cos.cpu().numpy()


BF16_DOT_ERROR = 0.015
"""A bound on |cos - the bf16 product of bf16-rounded unit vectors|: 2 x 2^-8 for rounding both inputs, 2^-8 for
rounding the result, with room for the accumulation; the candidate search's margin."""


@torch.inference_mode()
def decoder_neighbors(sae: SAE, n: int = 10, chunk: int = 1024, search_dtype: torch.dtype | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` other latents with the most similar decoder directions (cosine): ids and cosines ``[d_sae, n]``.

    ``search_dtype=torch.bfloat16`` (where bf16 matmuls are fast: AMX CPUs, GPUs) finds ``8n`` candidates per latent
    in bf16 and ranks them in fp32; a latent whose fp32 ``n``-th best does not clear the best non-candidate's bf16
    cosine by ``BF16_DOT_ERROR`` is redone in fp32, so the result is the fp32 one either way (~2x faster at 131k
    latents on AMX, where the d_sae^2 products dominate)."""
    dirs = sae.decoder_directions().detach().float()
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_sae = dirs.shape[0]
    n = min(n, d_sae - 1)
    wide = min(8 * n, d_sae - 1)
    low = dirs.to(search_dtype) if search_dtype not in (None, torch.float32) and wide > n else None
    ids, cos = [], []
    for start in range(0, d_sae, chunk):
        block = dirs[start : start + chunk]
        if low is None:
            top_ids, top_values = _nearest(block, dirs, start, n)
        else:
            cand = _nearest(low[start : start + chunk], low, start, wide + 1)
            exact = torch.einsum("bd,bkd->bk", block, dirs[cand[0][:, :wide]])
            top = exact.topk(n, dim=1)
            top_ids, top_values = cand[0][:, :wide].gather(1, top.indices), top.values
            # a non-candidate's true cosine is at most its bf16 one (<= the (wide+1)-th value) plus the error bound
            redo = (top_values[:, -1] <= cand[1][:, wide].float() + BF16_DOT_ERROR).nonzero(as_tuple=True)[0]
            if len(redo):
                top_ids[redo], top_values[redo] = _nearest(block[redo], dirs, start, n, rows=redo)
        ids.append(top_ids.cpu())
        cos.append(top_values.cpu())
    return torch.cat(ids).numpy().astype(np.int32), torch.cat(cos).numpy()


RECALL_SAMPLE = 512
"""Latents whose exact neighbours are recomputed to measure an approximate search's recall@n."""


class NeighborFacts(NamedTuple):
    """Decoder neighbours ``[d_sae, n]`` and how they were found (the manifest's ``neighbors``)."""

    ids: np.ndarray
    cos: np.ndarray
    info: dict


@torch.inference_mode()
def latent_neighbors(sae: SAE, n: int = 10, *, exact_max: int = 65_536, n_probe: int = 32,
                     search_dtype: torch.dtype | None = None, seed: int = 0) -> NeighborFacts:
    """Decoder neighbours, exact (``decoder_neighbors``) up to ``exact_max`` latents; wider SAEs through an IVF index
    (``engine.analysis.ivf``) whose recall@n against the exact neighbours is measured on ``RECALL_SAMPLE`` latents."""
    d_sae = sae.cfg.d_sae
    n = min(n, d_sae - 1)
    if d_sae <= exact_max:
        ids, cos = decoder_neighbors(sae, n, search_dtype=search_dtype)
        return NeighborFacts(ids, cos, {"method": "exact", "n": n, "exact_max": exact_max})
    dirs = sae.decoder_directions().detach().float()
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_lists = default_lists(d_sae)
    found = ivf_neighbors(dirs, n, n_lists=n_lists, n_probe=n_probe, seed=seed)
    recall = recall_at_n(dirs, found.ids, RECALL_SAMPLE, seed=seed)
    info = {"method": "ivf", "n": n, "exact_max": exact_max, "n_lists": n_lists, "n_probe": min(n_probe, n_lists),
            "recall_at_n": round(recall.value, 4), "recall_sample": len(recall.rows),
            "pairs_compared": round(found.compared, 4)}
    return NeighborFacts(found.ids, found.cos, info)


def _nearest(block: torch.Tensor, dirs: torch.Tensor, start: int, n: int, rows: torch.Tensor | None = None):
    """Ids and cosines of the ``n`` nearest of ``dirs`` to each row of ``block`` (latents ``start + rows``, by default
    ``start + arange``), itself excluded."""
    sims = block @ dirs.T
    rows = torch.arange(len(block), device=block.device) if rows is None else rows
    sims[torch.arange(len(block), device=block.device), rows + start] = -float("inf")  # not its own neighbour
    top = sims.topk(n, dim=1)
    return top.indices, top.values


def labels_from_examples(
    features: range,
    feature_id: np.ndarray,
    acts: np.ndarray,
    token_ids: np.ndarray,
    vocab: list[str],
    *,
    n_label: int = 3,
    n_tokens: int = 10,
) -> tuple[list[str], np.ndarray]:
    """Label each latent in ``features`` by the tokens carrying most of its activation in its examples.

    ``acts, token_ids [rows, pos]`` are the example windows of those latents. Returns the labels (``""`` for
    latents with no examples) and ``[len(features), n_tokens]`` token ids by activation mass (-1 padded).
    """
    rows, cols = np.nonzero(acts > 0)
    feat = feature_id[rows].astype(np.int64)
    tok = token_ids[rows, cols].astype(np.int64)
    key = feat * len(vocab) + tok
    uniq, inverse = np.unique(key, return_inverse=True)
    total = np.bincount(inverse, weights=acts[rows, cols].astype(np.float64))
    f_of, t_of = uniq // len(vocab), uniq % len(vocab)
    order = np.lexsort((-total, f_of))  # by feature, then mass descending
    f_sorted, t_sorted = f_of[order], t_of[order]
    ids = np.arange(features.start, features.stop)
    first, last = np.searchsorted(f_sorted, ids), np.searchsorted(f_sorted, ids, side="right")
    top = np.full((len(ids), n_tokens), -1, dtype=np.int32)
    labels: list[str] = []
    for i in range(len(ids)):  # once per run, after the pass
        picked = t_sorted[first[i] : min(last[i], first[i] + n_tokens)]
        top[i, : len(picked)] = picked
        shown: list[str] = []
        for t in picked:
            text = short_token(vocab[t])
            if text not in shown:
                shown.append(text)
            if len(shown) == n_label:
                break
        labels.append(" / ".join(shown))
    return labels, top
