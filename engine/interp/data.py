"""A latent's examples from a run, split into what the explainer sees and what the scorers test it on.

The explainer sees the even-ranked top examples (the 1st, 3rd, ... strongest contexts). Scorers see none of
those contexts: the odd-ranked top examples and one quantile-sampled example per activation interval (from the
highest down), and as many **non-activating** excerpts from a pool of random run contexts on which the subject
SAE was run once (``pool``): a pool context counts as non-activating for a latent that fires on none of its
counted tokens. Excerpts are windows around the maximum (``before`` tokens before it, ``after`` after).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..run.store import RunStore
from .scorers import Excerpt


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

    def close(self) -> None:
        self.store.close()

    def contexts(self, ids: list[int]) -> dict[int, list[int]]:
        return self.store.contexts(ids)

    def context_ids(self) -> np.ndarray:
        return self.store.context_ids()

    def labels(self, ids: list[int]) -> dict[int, str]:
        return self.store.labels(ids)

    def latents(
        self, ids: list[int], *, n_shown: int = 10, n_top_heldout: int = 5, n_quantile_heldout: int = 5
    ) -> list[LatentData]:
        """Explainer and scorer excerpts of each latent in ``ids`` (latents without examples get empty lists)."""
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
            out.append(LatentData(fid, [self._excerpt(r, contexts) for r in shown_rows],
                                  [self._excerpt(r, contexts) for r in held], labels.get(fid, "")))
        return out

    def _excerpt(self, row: tuple, contexts: dict[int, list[int]]) -> Excerpt:
        _, _, _, _, cid, max_pos, start, acts = row
        ids = contexts[int(cid)][int(start) : int(start) + len(acts)]
        lo, hi = _window(int(max_pos) - int(start), len(acts), self.before, self.after)
        return Excerpt(int(cid), [self.vocab[t] for t in ids[lo:hi]], [float(a) for a in acts[lo:hi]], True,
                       int(start) + lo)

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
