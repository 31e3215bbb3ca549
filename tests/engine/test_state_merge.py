"""Merging partial states over disjoint tokens equals one state over all of them (sharded precompute's merge)."""

from __future__ import annotations

import pytest
import torch

from engine.precompute.darkmatter import LinearErrorStats
from engine.precompute.metrics import ReconStats


def _data(n: int = 600, d: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * 3 + 5  # far from zero: shifts matter
    e = x @ torch.randn(d, d, generator=gen) * 0.1 + torch.randn(n, d, generator=gen) * 0.2 + 1
    heldout = torch.rand(n, generator=gen) < 0.2
    return x, e, heldout


def test_recon_stats_merge_equals_one_stream():
    x, e, _ = _data()
    whole, parts = ReconStats(x.shape[1]), [ReconStats(x.shape[1]) for _ in range(3)]
    whole.update(x, x - e, n_active=7 * len(x))
    for part, rows in zip(parts, torch.tensor_split(torch.arange(len(x)), [100, 450]), strict=True):
        part.update(x[rows], x[rows] - e[rows], n_active=7 * len(rows))
    merged = ReconStats(x.shape[1])
    for part in parts:
        merged.merge(part)
    assert merged.summary() == pytest.approx(whole.summary(), rel=1e-12, abs=1e-12)


def test_linear_error_stats_merge_recentres_exactly():
    x, e, heldout = _data()
    whole = LinearErrorStats(x.shape[1])
    whole.update(x, e, heldout)
    merged = LinearErrorStats(x.shape[1])
    for rows in torch.tensor_split(torch.arange(len(x)), [37, 300]):
        part = LinearErrorStats(x.shape[1])  # each part shifts by its own first batch's mean
        part.update(x[rows], e[rows], heldout[rows])
        merged.merge(part)
    a, b = whole.fit(), merged.fit()
    assert torch.allclose(a.W, b.W, atol=1e-5) and torch.allclose(a.b, b.b, atol=1e-4)
    for key, value in a.metrics.items():
        assert b.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-8), key
    assert merged.fit_part.n + merged.score_part.n == len(x)


def test_merging_an_empty_state_changes_nothing():
    x, e, heldout = _data(n=50)
    state = LinearErrorStats(x.shape[1])
    state.update(x, e, heldout)
    before = state.fit().metrics
    state.merge(LinearErrorStats(x.shape[1]))
    assert state.fit().metrics == before
