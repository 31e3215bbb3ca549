"""A latent's examples from a run, split into what the explainer sees and what the scorers test it on.

Every activating excerpt carries its **quantile**: which of the run's ``quantile_bins`` equal-width intervals of
``[0, the latent's maximum]`` its context's maximum falls in, counted from the top (0 = the highest interval).

* ``sampling="quantiles"`` (the default, after delphi's samplers): the latent's top and quantile-sampled contexts,
  one per context, grouped by quantile and shuffled (seeded by the latent); round by round, from the highest
  quantile down, the scorers take one of each quantile and the explainer the next, until ``n_heldout`` and
  ``n_shown`` are reached. Both see the whole activation range; they never share a context.
* ``sampling="top"`` (saescope's earlier default): the explainer sees the even-ranked top examples (the 1st, 3rd,
  ... strongest contexts); the scorers the odd-ranked ones and one quantile-sampled example per interval, from the
  highest down.

The scorers also get as many **non-activating** excerpts from a pool of random run contexts on which the subject
SAE was run once (``pool``): a pool context counts as non-activating for a latent that fires on none of its
counted tokens. Excerpts are windows around the maximum (``before`` tokens before it, ``after`` after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..run.store import RunStore
from .scorers import Excerpt

SAMPLINGS = ("quantiles", "top")


@dataclass(frozen=True)
class QuietPool:
    """Where each latent fires on a pool of run contexts (``explain.quiet_pool`` computes it)."""

    ids: np.ndarray
    """Pool context ids."""
    ctx_len: int
    latents: np.ndarray
    """Latent of each firing (pool row, position), sorted."""
    where: np.ndarray
    """``row * ctx_len + position`` of each firing, in the order of ``latents``."""
    d_sae: int


@dataclass(frozen=True)
class LatentData:
    feature_id: int
    shown: list[Excerpt]
    """Excerpts for the explainer (activating)."""
    heldout: list[Excerpt]
    """Activating excerpts for the scorers (contexts the explainer did not see)."""
    label: str
    top: list[Excerpt] = field(default_factory=list)
    """Every top example (strongest first): the intruder check's activating excerpts (it needs no explanation)."""


def _window(max_pos: int, length: int, before: int, after: int) -> tuple[int, int]:
    lo = max(0, max_pos - before)
    hi = min(length, max_pos + after + 1)
    return lo, hi


class RunExamples:
    """A finished run's examples, contexts and vocabulary, read through its ``RunStore`` (named statements over its
    read-only index): this module keeps only which excerpts go where."""

    def __init__(self, run_dir: str | Path, *, before: int = 20, after: int = 8):
        self.run_dir = Path(run_dir)
        self.before, self.after = before, after
        self.store = RunStore.open(self.run_dir)
        self.vocab = self.store.vocab
        self.n_quantiles = int((self.store.manifest().get("settings") or {}).get("quantile_bins") or 10)

    def close(self) -> None:
        self.store.close()

    def contexts(self, ids: list[int]) -> dict[int, list[int]]:
        return self.store.contexts(ids)

    def context_ids(self) -> np.ndarray:
        return self.store.context_ids()

    def labels(self, ids: list[int]) -> dict[int, str]:
        return self.store.labels(ids)

    def latents(self, ids: list[int], *, n_shown: int = 10, n_top_heldout: int = 5, n_quantile_heldout: int = 5,
                sampling: str = "quantiles", seed: int = 0) -> list[LatentData]:
        """Explainer and scorer excerpts of each latent in ``ids`` (latents without examples get empty lists):
        ``sampling="quantiles"`` takes ``n_top_heldout + n_quantile_heldout`` held-out excerpts across quantiles,
        ``"top"`` as many of each kind (see the module's docstring)."""
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; use {', '.join(SAMPLINGS)}")
        rows = self.store.example_rows(ids)
        contexts = self.contexts(sorted({int(r[4]) for r in rows}))
        labels = self.labels(ids)
        by_feature: dict[int, list[tuple]] = {}
        for row in rows:
            by_feature.setdefault(int(row[0]), []).append(row)
        out = []
        for fid in ids:
            top = [r for r in by_feature.get(fid, []) if r[1] == "top"]
            quant = [r for r in by_feature.get(fid, []) if r[1] == "quantile"]
            peak = max((max(r[7]) for r in top), default=0.0)
            if sampling == "quantiles":
                shown_rows, held = self._by_quantile(top, quant, peak, n_shown, n_top_heldout + n_quantile_heldout,
                                                     np.random.default_rng([seed, fid]))
            else:
                shown_rows, held = self._by_rank(top, quant, n_shown, n_top_heldout, n_quantile_heldout)
            shown_ex, held_ex, top_ex = ([self._excerpt(r, contexts, self._quantile(r, peak)) for r in group]
                                         for group in (shown_rows, held, top))
            out.append(LatentData(fid, shown_ex, held_ex, labels.get(fid, ""), top_ex))
        return out

    def _quantile(self, row: tuple, peak: float) -> int:
        """0 for the highest of the run's equal-width activation intervals on ``[0, peak]``; a quantile row's own."""
        n = self.n_quantiles
        if row[3] is not None:
            return n - 1 - int(row[3])
        b = int(max(row[7]) / peak * n) if peak > 0 else n - 1
        return n - 1 - min(max(b, 0), n - 1)

    def _by_quantile(self, top: list[tuple], quant: list[tuple], peak: float, n_shown: int, n_held: int,
                     rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
        groups: dict[int, list[tuple]] = {}
        seen: set[int] = set()
        for r in top + quant:  # one row per context (a top context may be sampled in its interval too)
            if int(r[4]) not in seen:
                seen.add(int(r[4]))
                groups.setdefault(self._quantile(r, peak), []).append(r)
        for q in groups:
            groups[q] = [groups[q][int(i)] for i in rng.permutation(len(groups[q]))]
        shown: list[tuple] = []
        held: list[tuple] = []
        while any(groups.values()) and (len(shown) < n_shown or len(held) < n_held):
            for q in sorted(groups):
                for take, limit in ((held, n_held), (shown, n_shown)):
                    if groups[q] and len(take) < limit:
                        take.append(groups[q].pop())
        return shown, held

    @staticmethod
    def _by_rank(top: list[tuple], quant: list[tuple], n_shown: int, n_top_heldout: int, n_quantile_heldout: int
                 ) -> tuple[list[tuple], list[tuple]]:
        shown_rows = top[0::2][:n_shown]
        seen = {int(r[4]) for r in shown_rows}
        held = [r for r in top[1::2] if int(r[4]) not in seen][:n_top_heldout]
        used = seen | {int(r[4]) for r in held}
        by_bin: dict[int, tuple] = {}
        for r in quant:  # one per interval, highest interval first
            if int(r[4]) not in used and r[3] not in by_bin:
                by_bin[r[3]] = r
        for b in sorted(by_bin, reverse=True)[:n_quantile_heldout]:
            held.append(by_bin[b])
            used.add(int(by_bin[b][4]))
        return shown_rows, held

    def _excerpt(self, row: tuple, contexts: dict[int, list[int]], quantile: int) -> Excerpt:
        _, _, _, _, cid, max_pos, start, acts = row
        ids = contexts[int(cid)][int(start) : int(start) + len(acts)]
        lo, hi = _window(int(max_pos) - int(start), len(acts), self.before, self.after)
        return Excerpt(int(cid), [self.vocab[t] for t in ids[lo:hi]], [float(a) for a in acts[lo:hi]], True,
                       int(start) + lo, quantile)

    def quiet_excerpts(self, pool: QuietPool, feature_id: int, n: int, seed: int,
                       exclude: set[int] | None = None) -> list[Excerpt]:
        """``n`` excerpts of pool contexts in whose window latent ``feature_id`` fires on no token (random windows,
        never starting at position 0, at most one per context), from none of the contexts ``exclude`` (those the
        explainer saw: a quiet window of one could repeat tokens of the excerpt it was shown)."""
        if n == 0 or len(pool.ids) == 0:
            return []
        width = min(self.before + self.after + 1, pool.ctx_len - 1)
        fired = np.zeros((len(pool.ids), pool.ctx_len), bool)
        lo_i, hi_i = np.searchsorted(pool.latents, [feature_id, feature_id + 1])
        flat = pool.where[lo_i:hi_i]
        fired[flat // pool.ctx_len, flat % pool.ctx_len] = True
        # windows [s, s + width) with no firing token: prefix sums over each context
        csum = np.concatenate([np.zeros((len(pool.ids), 1), np.int32), fired.cumsum(1, dtype=np.int32)], axis=1)
        starts = np.arange(1, pool.ctx_len - width + 1)
        quiet = (csum[:, starts + width] - csum[:, starts]) == 0  # [pool, n_starts]
        if exclude:
            quiet[np.isin(pool.ids, list(exclude))] = False
        rows = np.flatnonzero(quiet.any(1))
        if len(rows) == 0:
            return []
        rng = np.random.default_rng([seed, feature_id])
        rows = rng.choice(rows, size=min(n, len(rows)), replace=False)
        picks = [(int(r), int(starts[rng.choice(np.flatnonzero(quiet[r]))])) for r in rows]
        contexts = self.contexts([int(pool.ids[r]) for r, _ in picks])
        out = []
        for r, s in picks:
            cid = int(pool.ids[r])
            window = contexts[cid][s : s + width]
            out.append(Excerpt(cid, [self.vocab[t] for t in window], [0.0] * len(window), False, s))
        return out
