"""The CE-scored contexts are a uniform sample of the run's held-out contexts, for one shard and for a merge.

Exact distribution: every ``n``-subset of the ``N`` held-out contexts equally likely (``1 / C(N, n)``). Each case
draws the scored subset under many seeds and runs a chi-square goodness-of-fit test against it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.precompute.sampling import HELDOUT_EVERY, ContextSample

N_HELDOUT, N_SCORED, SEEDS = 6, 2, 400
ALPHA = 1e-3


def offer_all(sample: ContextSample, context_ids: list[int], batch: int = 4) -> None:
    for start in range(0, len(context_ids), batch):
        ids = torch.tensor(context_ids[start : start + batch])
        n = len(ids)
        sample.offer(ids, torch.zeros(n, 2, dtype=torch.int64), torch.ones(n, 2, dtype=torch.bool),
                     torch.zeros(n, 2, 1), torch.zeros(n, 2, 1), torch.zeros(n, 2, dtype=torch.int64))


def contexts() -> list[int]:
    """Context ids 0..N*HELDOUT_EVERY-1: ``N_HELDOUT`` of them held out."""
    return list(range(N_HELDOUT * HELDOUT_EVERY))


def p_uniform(counts: dict[frozenset, int]) -> float:
    """Chi-square p-value of the subset counts against the uniform distribution over all ``n``-subsets."""
    heldout = [c for c in contexts() if c % HELDOUT_EVERY == 0]
    cells = [frozenset(s) for s in itertools.combinations(heldout, N_SCORED)]
    assert set(counts) <= set(cells)
    observed = np.array([counts.get(c, 0) for c in cells], float)
    expected = np.full(len(cells), observed.sum() / math.comb(N_HELDOUT, N_SCORED))
    return float(chisquare(observed, expected).pvalue)


def one_shard(capacity: int, seed: int, pick) -> frozenset:
    sample = ContextSample(capacity, 2, 1, seed=seed)
    offer_all(sample, contexts())
    return frozenset(int(c) for c in sample.context_id[pick(sample)])


def two_shards(capacity: int, seed: int) -> frozenset:
    ids = contexts()
    cut = 2 * HELDOUT_EVERY + 5  # shard 0 holds 3 held-out contexts, shard 1 the other 3
    first, second = ContextSample(capacity, 2, 1, seed=2 * seed), ContextSample(capacity, 2, 1, seed=2 * seed + 1)
    offer_all(first, ids[:cut])
    offer_all(second, ids[cut:])
    first.merge(second, np.random.default_rng(seed))
    return frozenset(int(c) for c in first.context_id[first.scored(N_SCORED)])


def tally(draw) -> dict[frozenset, int]:
    counts: dict[frozenset, int] = {}
    for seed in range(SEEDS):
        key = draw(seed)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("capacity", [16, 4], ids=["run-under-capacity", "run-over-capacity"])
def test_scored_contexts_are_uniform_one_shard(capacity):
    assert p_uniform(tally(lambda s: one_shard(capacity, s, lambda smp: smp.scored(N_SCORED)))) > ALPHA


@pytest.mark.parametrize("capacity", [16, 4], ids=["run-under-capacity", "run-over-capacity"])
def test_scored_contexts_are_uniform_two_shards_merged(capacity):
    assert p_uniform(tally(lambda s: two_shards(capacity, s))) > ALPHA


def test_first_slots_are_not_uniform():
    """The test has power: the reservoir's first slots (the old choice) fail it on a run under the capacity."""
    counts = tally(lambda s: one_shard(16, s, lambda smp: torch.arange(N_SCORED)))
    assert counts == {frozenset({0, HELDOUT_EVERY}): SEEDS}
    assert p_uniform(counts) < ALPHA


def test_scored_slots_stay_while_the_sample_is_full():
    """Once every slot is filled, a later snapshot scores the same contexts unless one was evicted (its losses are
    cached), and the choice is the filled slots first in ``priority``."""
    sample = ContextSample(3, 2, 1, seed=3)
    offer_all(sample, contexts()[:30])  # 3 held-out contexts fill the 3 slots
    before = sample.scored(2)
    assert set(before.tolist()) == set(sample.priority.argsort()[:2].tolist())
    ids_before = set(sample.context_id[before].tolist())
    offer_all(sample, contexts()[30:])
    after = sample.scored(2)
    assert set(after.tolist()) == set(before.tolist())
    kept = {int(sample.context_id[s]) for s in after} & ids_before
    evicted = ids_before - set(sample.context_id.tolist())
    assert kept == ids_before - evicted


def test_a_state_saved_without_the_order_still_scores_filled_slots():
    sample = ContextSample(8, 2, 1, seed=1)
    offer_all(sample, contexts())
    del sample.priority  # as a task state written before the order existed loads
    chosen = sample.scored(4)
    assert len(chosen) == 4 and (sample.context_id[chosen] >= 0).all() and len(set(chosen.tolist())) == 4
