"""Top-k and quantile example reservoirs for every latent, kept on the device and merged with vectorised ops.

An *item* is one (latent, context) pair: the context's maximum activation of the latent, its position,
and the latent's activation on every token of the context. Each latent owns ``k + n_int * per_int``
physical slots. Items never move between slots: each batch decides which old items survive and which
candidates enter, and entrants fill the freed slots, so per batch only the entrants' activation rows
are written (no shifting of the ``[d_sae, slots, pos]`` activation buffer).

* Top: the ``k`` contexts with the largest maximum activation (exact; ties go to the earlier context).
* Quantile: ``n_int`` internal bins of equal width on ``[0, hi)`` where ``hi`` is the power of two just
  above the latent's running maximum. Every candidate gets a uniform random key and each bin keeps the
  ``per_int`` items with the smallest keys (bottom-k sampling: a uniform sample of the contexts in that
  bin). When the maximum passes ``hi``, ``hi`` doubles and pairs of bins merge; keeping the smallest
  keys of the union is again a uniform sample of the union, so no rebinning pass is needed.
  At the end the output bins are ``n_bins`` equal intervals of ``[0, max_act]``; each takes the
  ``per_bin`` smallest-key items whose activation falls inside it. Because ``hi <= 2 * max_act``,
  every output bin spans at least one internal bin, so the examples cover the whole range; within
  an output bin the sample is random, though not exactly uniform where internal bins straddle its edges.

Activations are stored as float16 ratios to the item's maximum (exact shape, ~3 significant digits,
no overflow), and returned as float32 activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .accumulators import pow2_above

EMPTY_KEY = float("inf")


@dataclass(frozen=True)
class ExampleRows:
    """Final example rows, sorted by (feature_id, kind, rank); ``kind`` 0 = top, 1 = quantile."""

    feature_id: np.ndarray
    kind: np.ndarray
    rank: np.ndarray
    quantile_bin: np.ndarray
    context_id: np.ndarray
    max_pos: np.ndarray
    max_act: np.ndarray
    acts: np.ndarray
    """``[rows, pos]`` float32."""


def _rank_in_group(group: torch.Tensor) -> torch.Tensor:
    """For rows sorted so equal ``group`` values are adjacent: the index of each element within its run."""
    idx = torch.arange(group.shape[1], device=group.device).expand_as(group)
    start = torch.ones_like(group, dtype=torch.bool)
    start[:, 1:] = group[:, 1:] != group[:, :-1]
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values


def _by_value_then_id(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, indices ordering by value descending, ties broken by the lower context id (like a stable sort)."""
    by_id = ids.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_id).argsort(dim=1, descending=True, stable=True)
    return by_id.gather(1, by_value)


def _members(order: torch.Tensor, won: torch.Tensor, n_old: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From winners' indices into ``cat([old, new], 1)``: which old slots survive, which candidates enter."""
    flags = torch.zeros(order.shape[0], n_old + n_new + 1, dtype=torch.bool, device=order.device)
    flags.scatter_(1, order.masked_fill(~won, n_old + n_new), True)  # losers all land in the spare column
    return flags[:, :n_old], flags[:, n_old : n_old + n_new]


class ExampleReservoirs:
    """Per-latent top-k and quantile example reservoirs over contexts of ``context_len`` tokens."""

    def __init__(
        self,
        d_sae: int,
        context_len: int,
        device: torch.device | str = "cpu",
        *,
        top_k: int = 20,
        n_bins: int = 10,
        per_bin: int = 5,
        internal_bins: int = 20,
        seed: int = 0,
    ):
        if internal_bins < n_bins:
            raise ValueError(f"internal_bins ({internal_bins}) must be at least n_bins ({n_bins})")
        self.k, self.n_bins, self.per_bin = top_k, n_bins, per_bin
        self.n_int, self.per_int = internal_bins, per_bin
        self.n_slots = top_k + internal_bins * per_bin
        self.device = torch.device(device)
        self.val = torch.zeros(d_sae, self.n_slots, device=device)
        self.key = torch.full((d_sae, self.n_slots - top_k), EMPTY_KEY, device=device)
        self.ctx = torch.full((d_sae, self.n_slots), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(d_sae, self.n_slots, dtype=torch.int16, device=device)
        self.acts = torch.zeros(d_sae, self.n_slots, context_len, dtype=torch.float16, device=device)
        self.hi = torch.zeros(d_sae, device=device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def update(self, codes: torch.Tensor, context_ids: torch.Tensor) -> None:
        """Offer the contexts of a batch: ``codes [batch, pos, d_sae]`` (zero at excluded tokens)."""
        codes = codes.float()
        cmax, cpos = codes.max(dim=1)  # [batch, d_sae]
        cand = cmax.T.contiguous()  # [d_sae, batch]
        ctx = context_ids.to(self.device, torch.int64)
        self._merge_top(codes, cand, cpos, ctx)
        self._merge_quantile(codes, cand, cpos, ctx)

    # --- membership rules -------------------------------------------------------------
    def _merge_top(self, codes, cand, cpos, ctx) -> None:
        k = self.k
        values = torch.cat([self.val[:, :k], cand], 1)
        ids = torch.cat([self.ctx[:, :k], ctx[None, :].expand_as(cand)], 1)
        order = _by_value_then_id(values, ids)[:, :k]
        keep, enter = _members(order, values.gather(1, order) > 0, k, cand.shape[1])
        self._fill(0, k, keep, enter, codes, cand, cpos, ctx)

    def _merge_quantile(self, codes, cand, cpos, ctx) -> None:
        k, n_int = self.k, self.n_int
        batch_max = cand.amax(1)
        self.hi = torch.where(batch_max >= self.hi, pow2_above(batch_max), self.hi)
        scale = (n_int / self.hi.clamp_min(1e-30))[:, None]
        new_key = torch.rand(cand.shape, generator=self.gen, device=self.device).masked_fill_(cand <= 0, EMPTY_KEY)
        keys = torch.cat([self.key, new_key], 1)
        bins = (torch.cat([self.val[:, k:], cand], 1) * scale).floor_().clamp_(max=n_int - 1)
        live = keys < EMPTY_KEY
        composite = torch.where(live, bins.double() + keys.double(), torch.full_like(keys, EMPTY_KEY, dtype=torch.float64))
        _, order = composite.sort(dim=1)
        sorted_bins = torch.where(live, bins, torch.full_like(bins, float(n_int))).gather(1, order)
        won = (_rank_in_group(sorted_bins) < self.per_int) & (sorted_bins < n_int)
        keep, enter = _members(order, won, self.key.shape[1], cand.shape[1])
        self._fill(k, self.n_slots, keep, enter, codes, cand, cpos, ctx, new_key)

    # --- slot bookkeeping ----------------------------------------------------------------
    def _fill(self, lo, hi, keep, enter, codes, cand, cpos, ctx, new_key=None) -> None:
        """Entrants take the freed slots of region ``[lo, hi)``; slots freed and not refilled become empty."""
        free = ~keep
        free_rank = free.long().cumsum(1) - 1
        lat_f, slot_f = free.nonzero(as_tuple=True)
        slot_of = torch.full_like(free_rank, -1)
        slot_of[lat_f, free_rank[lat_f, slot_f]] = slot_f
        lat, b = enter.nonzero(as_tuple=True)
        slot = slot_of[lat, (enter.long().cumsum(1) - 1)[lat, b]]
        emptied = free.clone()
        emptied[lat, slot] = False
        region = slice(lo, hi)
        self.ctx[:, region][emptied] = -1
        self.val[:, region][emptied] = 0.0
        if new_key is not None:
            self.key[emptied] = EMPTY_KEY
            self.key[lat, slot] = new_key[lat, b]
        if not len(lat):
            return
        value = cand[lat, b]
        phys = slot + lo
        self.val[lat, phys] = value
        self.ctx[lat, phys] = ctx[b]
        self.pos[lat, phys] = cpos[b, lat].to(torch.int16)
        self.acts[lat, phys] = (codes[b, :, lat] / value[:, None]).to(torch.float16)

    # --- results ---------------------------------------------------------------------------
    def max_act(self) -> torch.Tensor:
        """Largest context maximum seen per latent ``[d_sae]``."""
        return self.val[:, : self.k].amax(1)

    def rows(self) -> ExampleRows:
        """Top examples by activation, then quantile examples (highest activation first), per latent."""
        k, d_sae = self.k, self.val.shape[0]
        top_slots = _by_value_then_id(self.val[:, :k], self.ctx[:, :k])
        top_val = self.val[:, :k].gather(1, top_slots)

        qv, live = self.val[:, k:], self.key < EMPTY_KEY
        qbin = (qv / self.max_act().clamp_min(1e-30)[:, None] * self.n_bins).floor_().clamp_(max=self.n_bins - 1)
        composite = torch.where(live, qbin.double() + self.key.double(), torch.full_like(qv, EMPTY_KEY, dtype=torch.float64))
        _, order = composite.sort(dim=1)
        sorted_bins = torch.where(live, qbin, torch.full_like(qbin, float(self.n_bins))).gather(1, order)
        won = (_rank_in_group(sorted_bins) < self.per_bin) & (sorted_bins < self.n_bins)
        chosen = torch.zeros_like(live).scatter_(1, order, won)
        # bins are monotone in activation, so sorting by activation orders by bin too
        q_val, q_order = torch.where(chosen, qv, torch.full_like(qv, -1.0)).sort(dim=1, descending=True)

        lat = torch.arange(d_sae, device=self.device)[:, None].expand(d_sae, k + q_order.shape[1])
        slots = torch.cat([top_slots, q_order + k], 1)
        valid = torch.cat([top_val > 0, q_val > 0], 1)
        kind = torch.cat([torch.zeros_like(top_slots), torch.ones_like(q_order)], 1)
        rank = torch.cat([torch.arange(k, device=self.device).expand(d_sae, k), torch.arange(q_order.shape[1], device=self.device).expand_as(q_order)], 1)
        qbins = torch.cat([torch.full_like(top_slots, -1), qbin.gather(1, q_order).long()], 1)
        lat, slots, kind, rank, qbins = (t[valid] for t in (lat, slots, kind, rank, qbins))
        val = self.val[lat, slots]
        acts = self.acts[lat, slots].float() * val[:, None]
        return ExampleRows(
            feature_id=lat.cpu().numpy().astype(np.int32),
            kind=kind.cpu().numpy().astype(np.int8),
            rank=rank.cpu().numpy().astype(np.int16),
            quantile_bin=qbins.cpu().numpy().astype(np.int16),
            context_id=self.ctx[lat, slots].cpu().numpy().astype(np.int32),
            max_pos=self.pos[lat, slots].cpu().numpy().astype(np.int16),
            max_act=val.cpu().numpy().astype(np.float32),
            acts=acts.cpu().numpy(),
        )
