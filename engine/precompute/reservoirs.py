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
no overflow), and returned as float32 activations. With a ``window`` shorter than the context, an item keeps
only the ``window`` positions from ``start = clamp(max_pos - before, 0, context_len - window)`` (``before =
window - window // 4 - 1``: most of the window precedes the maximum, as excerpts do), so the activation buffer,
``d_sae x slots x window`` float16 values and most of the reservoirs' memory, shrinks by ``context_len / window``.

Top slots can carry a *payload* per item (e.g. the head attribution at the item's maximum), computed while its
batch is still in memory: ``top_candidates`` names the batch's (latent, context) pairs that can still enter the
top k, those whose maximum reaches the k-th largest maximum seen so far, buffered batches included (that value
only grows, and an item that enters at a merge is at least the k-th largest of everything merged, so every
entrant is among them); ``update`` takes their payload, and a merge copies the entrants' rows into their slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .accumulators import SparseCodes, pow2_above

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
    """``[rows, window]`` float32: position ``start + i`` of the context gets ``acts[:, i]``."""
    start: np.ndarray
    """``[rows]`` the first context position ``acts`` covers (0 where whole contexts are kept)."""
    payload: dict[str, np.ndarray] | None = None
    """Each row's payload by name (``[rows, *shape]``): meaningful for top rows (``kind`` 0) only."""


class _Batch(NamedTuple):
    sparse: SparseCodes
    """The batch's positive codes at statistic tokens."""
    row: torch.Tensor
    """``[nnz]`` each code's context within the batch."""
    pos: torch.Tensor
    """``[nnz]`` each code's position within its context."""
    cand: torch.Tensor
    """``[d_sae, batch]`` each context's maximum activation of each latent (0 = does not fire)."""
    ctx: torch.Tensor
    """``[batch]`` context ids."""
    payload: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    """Sorted keys ``context_id * d_sae + latent`` of the candidates' payload rows, and those rows by name."""


class TopCandidates(NamedTuple):
    """A batch's (latent, context) pairs that may enter the top k: what a payload must be computed for."""

    latent: torch.Tensor
    """``[P]`` latent ids."""
    row: torch.Tensor
    """``[P]`` context index within the batch."""
    pos: torch.Tensor
    """``[P]`` the earliest position of the context holding the latent's maximum (the item's ``max_pos``)."""


def _rank_in_group(group: torch.Tensor) -> torch.Tensor:
    """For rows sorted so equal ``group`` values are adjacent: the index of each element within its run."""
    idx = torch.arange(group.shape[1], device=group.device).expand_as(group)
    start = torch.ones_like(group, dtype=torch.bool)
    start[:, 1:] = group[:, 1:] != group[:, :-1]
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values


def _by_value_then_id(values: torch.Tensor, ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Per row, the indices of the ``k`` largest non-negative float32 ``values``, ties to the lower id (< 2**31).

    Non-negative floats order like their bit patterns, so one int64 key (value bits, then inverted id) sorts both.
    """
    key = (values.float().view(torch.int32).long() << 32) | (2**31 - 1 - ids.long())
    return key.topk(k or key.shape[1], dim=1).indices


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
        merge_contexts: int = 64,
        seed: int = 0,
        payload: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
        window: int | None = None,
    ):
        if internal_bins < n_bins:
            raise ValueError(f"internal_bins ({internal_bins}) must be at least n_bins ({n_bins})")
        if window is not None and window < 1:
            raise ValueError(f"an example window must hold at least one token, not {window}")
        self.context_len = context_len
        self.window = min(window or context_len, context_len)
        self.before = self.window - self.window // 4 - 1
        self.k, self.n_bins, self.per_bin = top_k, n_bins, per_bin
        self.n_int, self.per_int = internal_bins, per_bin
        self.n_slots = top_k + internal_bins * per_bin
        self.device = torch.device(device)
        self.val = torch.zeros(d_sae, self.n_slots, device=device)
        self.key = torch.full((d_sae, self.n_slots - top_k), EMPTY_KEY, device=device)
        self.ctx = torch.full((d_sae, self.n_slots), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(d_sae, self.n_slots, dtype=torch.int16, device=device)
        self.acts = torch.zeros(d_sae, self.n_slots, self.window, dtype=torch.float16, device=device)
        self.start = torch.zeros(d_sae, self.n_slots, dtype=torch.int16, device=device)
        self.hi = torch.zeros(d_sae, device=device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.merge_contexts = merge_contexts
        self._pending: list[tuple[SparseCodes, torch.Tensor]] = []
        # payload of the top slots (``payload`` names each item's shape and dtype), and of buffered candidates
        self.payload = {
            name: torch.zeros(d_sae, top_k, *shape, dtype=dtype, device=device)
            for name, (shape, dtype) in (payload or {}).items()
        }
        self._pending_payload: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self._seen_top = torch.zeros(d_sae, top_k, device=device) if payload else None
        self._candidates: TopCandidates | None = None

    def top_candidates(self, sparse: SparseCodes, n_contexts: int) -> TopCandidates:
        """The pairs of the next batch (``sparse`` as ``update`` takes it, ``n_contexts`` contexts) that may enter
        the top k; call it once per batch before ``update``, which then takes their payload, row for row."""
        if self._seen_top is None:
            raise ValueError("top_candidates needs reservoirs built with a payload")
        d_sae, n_pos = self.val.shape[0], self.context_len
        pair = (sparse.token // n_pos) * d_sae + sparse.latent
        cmax = torch.zeros(n_contexts * d_sae, device=self.device).scatter_reduce_(0, pair, sparse.value, "amax")
        cand = cmax.view(n_contexts, d_sae).T
        self._seen_top = torch.cat([self._seen_top, cand], 1).topk(self.k, dim=1).values
        latent, row = ((cand >= self._seen_top[:, -1:]) & (cand > 0)).nonzero(as_tuple=True)
        at_max = sparse.value == cmax[pair]
        first = torch.full((n_contexts * d_sae,), n_pos, dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, pair[at_max], sparse.token[at_max] % n_pos, "amin")
        found = TopCandidates(latent, row, first[row * d_sae + latent])
        self._candidates = found
        return found

    def update(self, sparse: SparseCodes, context_ids: torch.Tensor, payload: dict[str, torch.Tensor] | None = None) -> None:
        """Offer a batch of contexts: the positive codes at their statistic tokens (token index ``context * pos +
        position``, flattened over the batch) and the contexts' ids ``[batch]``, in increasing id order; with a
        payload, each of the batch's ``top_candidates`` pairs' rows (``[P, *shape]`` per name).

        Batches are buffered and merged ``merge_contexts`` contexts at a time: a merge's cost is mostly per
        latent, not per candidate, so fewer, wider merges are cheaper (the result is the same).
        """
        context_ids = context_ids.to(self.device, torch.int64)
        if self.payload:
            if self._candidates is None or payload is None or set(payload) != set(self.payload):
                raise ValueError(f"these reservoirs carry a payload ({', '.join(self.payload)}): call top_candidates "
                                 "for each batch, then update with the candidates' payload")
            found, self._candidates = self._candidates, None
            keys = context_ids[found.row] * self.val.shape[0] + found.latent
            self._pending_payload.append((keys, {name: payload[name].to(self.device) for name in self.payload}))
        self._pending.append((sparse, context_ids))
        if sum(len(ids) for _, ids in self._pending) >= self.merge_contexts:
            self.flush()

    @property
    def pending_contexts(self) -> int:
        """Contexts offered but not merged yet. Reading results merges them, and where a merge's boundaries
        fall decides which quantile samples are drawn: reading while this is 0 leaves the sequel unchanged."""
        return sum(len(ids) for _, ids in self._pending)

    def flush(self) -> None:
        """Merge the buffered batches now (results below call this)."""
        if not self._pending:
            return
        n_pos = self.context_len
        # each batch's first context; the last offset (the total) has no batch, so zip stops before it
        offsets = torch.tensor([0] + [len(ids) for _, ids in self._pending]).cumsum(0).tolist()
        sparse = SparseCodes(
            torch.cat([sp.token + offset * n_pos for (sp, _), offset in zip(self._pending, offsets, strict=False)]),
            torch.cat([sp.latent for sp, _ in self._pending]),
            torch.cat([sp.value for sp, _ in self._pending]),
        )
        context_ids = torch.cat([ids for _, ids in self._pending])
        payload = None
        if self.payload:
            keys = torch.cat([k for k, _ in self._pending_payload])
            keys, order = keys.sort()
            payload = (keys, {name: torch.cat([p[name] for _, p in self._pending_payload])[order] for name in self.payload})
        self._pending, self._pending_payload = [], []
        self._merge(sparse, context_ids, payload)

    @torch.inference_mode()
    def _merge(self, sparse: SparseCodes, context_ids: torch.Tensor, payload=None) -> None:
        n_batch, d_sae, n_pos = len(context_ids), self.val.shape[0], self.context_len
        row, pos = sparse.token // n_pos, sparse.token % n_pos
        cmax = torch.zeros(n_batch * d_sae, device=self.device)
        cmax.scatter_reduce_(0, row * d_sae + sparse.latent, sparse.value, "amax")
        batch = _Batch(sparse, row, pos, cmax.view(n_batch, d_sae).T.contiguous(), context_ids, payload)
        self._merge_top(batch)
        self._merge_quantile(batch)

    # --- membership rules (only on latents where something can change) ---------------------
    def _merge_top(self, batch: _Batch) -> None:
        k, cand = self.k, batch.cand
        # old items win ties (they come from earlier contexts), so only a strictly larger candidate enters
        rows = (cand.amax(1) > self.val[:, :k].amin(1)).nonzero(as_tuple=True)[0]
        if not len(rows):
            return
        values = torch.cat([self.val[rows, :k], cand[rows]], 1)
        ids = torch.cat([self.ctx[rows, :k], batch.ctx[None, :].expand(len(rows), -1)], 1)
        order = _by_value_then_id(values, ids, k)
        keep, enter = _members(order, values.gather(1, order) > 0, k, cand.shape[1])
        self._fill(rows, 0, keep, enter, batch)

    def _merge_quantile(self, batch: _Batch) -> None:
        k, n_int, cand = self.k, self.n_int, batch.cand
        batch_max = cand.amax(1)
        grown = batch_max >= self.hi
        self.hi = torch.where(grown, pow2_above(batch_max), self.hi)
        scale = (n_int / self.hi.clamp_min(1e-30))[:, None]
        live = self.key < EMPTY_KEY
        old_bins = torch.where(live, (self.val[:, k:] * scale).floor_().clamp_(max=n_int - 1), float(n_int)).long()
        new_key = torch.rand(cand.shape, generator=self.gen, device=self.device).masked_fill_(cand <= 0, EMPTY_KEY)
        new_bins = torch.where(cand > 0, (cand * scale).floor_().clamp_(max=n_int - 1), float(n_int)).long()
        # a candidate can enter only a bin with room or with an item of larger key; merged bins must be pruned
        count = torch.zeros(len(cand), n_int + 1, device=self.device).scatter_add_(1, old_bins, live.float())
        worst = torch.full_like(count, -1.0).scatter_reduce_(1, old_bins, self.key.masked_fill(~live, -1.0), "amax")
        could = (count.gather(1, new_bins) < self.per_int) | (new_key < worst.gather(1, new_bins))
        rows = ((could & (cand > 0)).any(1) | grown).nonzero(as_tuple=True)[0]
        if not len(rows):
            return
        keys = torch.cat([self.key[rows], new_key[rows]], 1)
        bins = torch.cat([old_bins[rows], new_bins[rows]], 1)
        live_all = keys < EMPTY_KEY
        composite = torch.where(live_all, bins.double() + keys.double(), torch.full_like(keys, EMPTY_KEY, dtype=torch.float64))
        _, order = composite.sort(dim=1)
        sorted_bins = bins.masked_fill(~live_all, n_int).gather(1, order)
        won = (_rank_in_group(sorted_bins) < self.per_int) & (sorted_bins < n_int)
        keep, enter = _members(order, won, self.key.shape[1], cand.shape[1])
        self._fill(rows, k, keep, enter, batch, new_key[rows])

    # --- slot bookkeeping ----------------------------------------------------------------
    def _fill(self, rows, lo, keep, enter, batch: _Batch, new_key=None) -> None:
        """For latents ``rows``: entrants take the freed slots of the region starting at ``lo``; slots freed
        and not refilled become empty."""
        free = ~keep
        free_rank = free.long().cumsum(1) - 1
        lf, sf = free.nonzero(as_tuple=True)
        slot_of = torch.full_like(free_rank, -1)
        slot_of[lf, free_rank[lf, sf]] = sf
        le, b = enter.nonzero(as_tuple=True)
        slot = slot_of[le, (enter.long().cumsum(1) - 1)[le, b]]
        emptied = free.clone()
        emptied[le, slot] = False
        ge, se = emptied.nonzero(as_tuple=True)
        self.ctx[rows[ge], lo + se] = -1
        self.val[rows[ge], lo + se] = 0.0
        if new_key is not None:
            self.key[rows[ge], se] = EMPTY_KEY
            self.key[rows[le], slot] = new_key[le, b]
        if not len(le):
            return
        lat, phys = rows[le], lo + slot
        value = batch.cand[lat, b]
        self.val[lat, phys] = value
        self.ctx[lat, phys] = batch.ctx[b]
        if lo == 0 and batch.payload is not None:
            self._take_payload(lat, phys, batch.ctx[b] * len(self.val) + lat, batch.payload)
        # the entrants' activation rows, from the sparse codes (O(nnz), not a strided gather of dense rows)
        n_batch, d_sae, n_pos = len(batch.ctx), self.val.shape[0], self.context_len
        entrant = torch.full((n_batch * d_sae,), -1, dtype=torch.int64, device=self.device)
        entrant[b * d_sae + lat] = torch.arange(len(lat), device=self.device)
        which = entrant[batch.row * d_sae + batch.sparse.latent]
        hit = which >= 0
        which, at, v = which[hit], batch.pos[hit], batch.sparse.value[hit]
        first_max = torch.where(v == value[which], at, n_pos)  # earliest position holding the maximum
        max_pos = torch.full_like(lat, n_pos).scatter_reduce_(0, which, first_max, "amin")
        start = (max_pos - self.before).clamp_(min=0, max=n_pos - self.window)
        self.pos[lat, phys] = max_pos.to(torch.int16)
        self.start[lat, phys] = start.to(torch.int16)
        self.acts[lat, phys] = 0
        offset = at - start[which]
        inside = (offset >= 0) & (offset < self.window)
        which, offset, v = which[inside], offset[inside], v[inside]
        self.acts[lat[which], phys[which], offset] = (v / value[which]).to(torch.float16)

    def _take_payload(self, lat, slot, keys, payload) -> None:
        """Copy the payload rows of entrants (``keys``) into their top slots."""
        sorted_keys, rows = payload
        at = torch.searchsorted(sorted_keys, keys).clamp_(max=max(len(sorted_keys) - 1, 0))
        if not len(sorted_keys) or not bool((sorted_keys[at] == keys).all()):
            raise RuntimeError("a top-k entrant has no payload: top_candidates missed it")
        for name, buffer in self.payload.items():
            buffer[lat, slot] = rows[name][at]

    # --- partial states (sharded runs) ----------------------------------------------------------
    STATE = ("val", "key", "ctx", "pos", "start", "acts", "hi")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the merged state (buffered batches are merged first); ``payload.<name>`` for payloads."""
        self.flush()
        return {**{name: getattr(self, name) for name in self.STATE},
                **{f"payload.{name}": buffer for name, buffer in self.payload.items()}}

    def load_state(self, tensors: dict[str, torch.Tensor], latents: range | None = None) -> ExampleReservoirs:
        """Take the state ``state_dict`` gave (its latents ``latents``, all by default; in place), on this device."""
        part = slice(latents.start, latents.stop) if latents is not None else slice(None)
        if tensors["acts"].shape[2] != self.window:
            raise ValueError(f"these reservoirs keep {self.window}-token example windows; the state holds "
                             f"{tensors['acts'].shape[2]}-token ones (written with another --example-window)")
        for name in self.STATE:
            if name == "start" and name not in tensors:  # a state written before windows: whole contexts
                self.start = torch.zeros_like(tensors["pos"][part], device=self.device)
                continue
            setattr(self, name, tensors[name][part].to(self.device))
        self.payload = {name[len("payload."):]: t[part].to(self.device) for name, t in tensors.items()
                        if name.startswith("payload.")}
        self._seen_top = self.val[:, : self.k].clone() if self.payload else None
        self._pending, self._pending_payload = [], []
        return self

    @torch.inference_mode()
    def merge(self, other: ExampleReservoirs) -> None:
        """Add the reservoirs of the same latents over other contexts (disjoint ids): the top k of both, exactly as
        one pass would keep them (ties to the lower context id); per quantile bin, the smallest keys of both (a
        uniform sample of the union, since keys are independent uniforms: each side must draw its own)."""
        self.flush()
        other.flush()
        k, n_pos = self.k, self.window

        def both(name: str, lo: int, hi: int | None) -> torch.Tensor:
            return torch.cat([getattr(self, name)[:, lo:hi], getattr(other, name)[:, lo:hi].to(self.device)], 1)

        def take(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
            return t.gather(1, order.view(*order.shape, *([1] * (t.ndim - 2))).expand(*order.shape, *t.shape[2:]))

        # top: the k largest maxima of both, ties to the lower context id
        top_val, top_ctx = both("val", 0, k), both("ctx", 0, k)
        top = _by_value_then_id(top_val, top_ctx, k)
        top_acts, top_pos = take(both("acts", 0, k), top), take(both("pos", 0, k), top)
        top_start = take(both("start", 0, k), top)
        for name, buffer in self.payload.items():
            self.payload[name] = take(torch.cat([buffer, other.payload[name].to(self.device)], 1), top)
        # quantile: per bin of the merged range, the per_int smallest keys of both
        n_int, n_q = self.n_int, self.key.shape[1]
        self.hi = torch.maximum(self.hi, other.hi.to(self.device))
        keys, vals = both("key", 0, None), both("val", k, None)
        live = keys < EMPTY_KEY
        bins = torch.where(live, (vals * (n_int / self.hi.clamp_min(1e-30))[:, None]).floor_().clamp_(max=n_int - 1),
                           float(n_int)).long()
        _, order = torch.where(live, bins.double() + keys.double(), float("inf")).sort(dim=1)
        sorted_bins = bins.gather(1, order)
        won = (_rank_in_group(sorted_bins) < self.per_int) & (sorted_bins < n_int)
        first = torch.sort((~won).to(torch.int8), dim=1, stable=True).indices[:, :n_q]  # winners first, in key order
        kept, won = order.gather(1, first), won.gather(1, first)
        q_val = vals.gather(1, kept).masked_fill_(~won, 0.0)
        q_key = keys.gather(1, kept).masked_fill_(~won, EMPTY_KEY)
        q_ctx = both("ctx", k, None).gather(1, kept).masked_fill_(~won, -1)
        q_pos = both("pos", k, None).gather(1, kept)
        q_start = both("start", k, None).gather(1, kept)
        q_acts = take(both("acts", k, None), kept).masked_fill_(~won[:, :, None].expand(-1, -1, n_pos), 0.0)
        self.val = torch.cat([top_val.gather(1, top), q_val], 1)
        self.ctx = torch.cat([top_ctx.gather(1, top), q_ctx], 1)
        self.pos = torch.cat([top_pos, q_pos], 1)
        self.start = torch.cat([top_start, q_start], 1)
        self.acts = torch.cat([top_acts, q_acts], 1)
        self.key = q_key
        if self._seen_top is not None:
            self._seen_top = self.val[:, :k].clone()

    # --- results ---------------------------------------------------------------------------
    def max_act(self) -> torch.Tensor:
        """Largest context maximum seen per latent ``[d_sae]``."""
        self.flush()
        return self.val[:, : self.k].amax(1)

    def context_ids(self) -> np.ndarray:
        """Every context id some reservoir holds (sorted, unique)."""
        self.flush()
        ids = self.ctx[self.ctx >= 0]
        return torch.unique(ids).cpu().numpy()

    def iter_rows(self, chunk: int = 1024):
        """``(range, rows)`` for consecutive latent ranges, so final arrays never exist for all latents at once."""
        for latents in self.ranges(chunk):
            yield latents, self.rows_of(latents)

    def ranges(self, chunk: int = 1024) -> list[range]:
        """Consecutive latent ranges of at most ``chunk`` latents covering every latent."""
        self.flush()
        return [range(lo, min(lo + chunk, self.val.shape[0])) for lo in range(0, self.val.shape[0], chunk)]

    def rows_of(self, latents: range) -> ExampleRows:
        """``rows`` of one of ``ranges`` (after ``ranges``, which merges what is buffered: safe from several
        threads at once, as reading does not change the reservoirs)."""
        return self.rows(latents.start, latents.stop)

    def rows(self, lo: int = 0, hi: int | None = None) -> ExampleRows:
        """Top examples by activation, then quantile examples (highest activation first), for latents ``[lo, hi)``."""
        self.flush()
        hi = self.val.shape[0] if hi is None else hi
        k, n, dev = self.k, hi - lo, self.device
        val, ctx, key = self.val[lo:hi], self.ctx[lo:hi], self.key[lo:hi]
        top_slots = _by_value_then_id(val[:, :k], ctx[:, :k])
        top_val = val[:, :k].gather(1, top_slots)

        qv, live = val[:, k:], key < EMPTY_KEY
        peak = val[:, :k].amax(1).clamp_min(1e-30)[:, None]
        qbin = (qv / peak * self.n_bins).floor_().clamp_(max=self.n_bins - 1)
        composite = torch.where(live, qbin.double() + key.double(), torch.full_like(qv, EMPTY_KEY, dtype=torch.float64))
        _, order = composite.sort(dim=1)
        sorted_bins = torch.where(live, qbin, torch.full_like(qbin, float(self.n_bins))).gather(1, order)
        won = (_rank_in_group(sorted_bins) < self.per_bin) & (sorted_bins < self.n_bins)
        chosen = torch.zeros_like(live).scatter_(1, order, won)
        # bins are monotone in activation, so sorting by activation orders by bin too
        q_val, q_order = torch.where(chosen, qv, torch.full_like(qv, -1.0)).sort(dim=1, descending=True)

        n_q = q_order.shape[1]
        lat = torch.arange(lo, hi, device=dev)[:, None].expand(n, k + n_q)
        slots = torch.cat([top_slots, q_order + k], 1)
        valid = torch.cat([top_val > 0, q_val > 0], 1)
        kind = torch.cat([torch.zeros_like(top_slots), torch.ones_like(q_order)], 1)
        rank = torch.cat([torch.arange(k, device=dev).expand(n, k), torch.arange(n_q, device=dev).expand(n, n_q)], 1)
        qbins = torch.cat([torch.full_like(top_slots, -1), qbin.gather(1, q_order).long()], 1)
        lat, slots, kind, rank, qbins = (t[valid] for t in (lat, slots, kind, rank, qbins))
        value = self.val[lat, slots]
        acts = self.acts[lat, slots].float() * value[:, None]
        top_slot = slots.clamp(max=k - 1)  # quantile rows read some top slot: their payload means nothing
        payload = {name: buffer[lat, top_slot].cpu().numpy() for name, buffer in self.payload.items()} or None
        return ExampleRows(
            feature_id=lat.cpu().numpy().astype(np.int32),
            kind=kind.cpu().numpy().astype(np.int8),
            rank=rank.cpu().numpy().astype(np.int16),
            quantile_bin=qbins.cpu().numpy().astype(np.int16),
            context_id=self.ctx[lat, slots].cpu().numpy().astype(np.int32),
            max_pos=self.pos[lat, slots].cpu().numpy().astype(np.int16),
            max_act=value.cpu().numpy().astype(np.float32),
            acts=acts.cpu().numpy(),
            start=self.start[lat, slots].cpu().numpy().astype(np.int16),
            payload=payload,
        )
