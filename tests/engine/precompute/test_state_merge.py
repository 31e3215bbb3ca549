"""Merging partial states over disjoint tokens equals one state over all of them (sharded precompute's merge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.metrics import ReconStats
from engine.precompute.darkmatter import LinearErrorStats


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
    rows = torch.arange(len(x))
    whole.update(x, e, heldout, rows // 16, rows % 16)
    merged = LinearErrorStats(x.shape[1])
    for rows in torch.tensor_split(torch.arange(len(x)), [37, 300]):
        part = LinearErrorStats(x.shape[1])  # each part shifts by its own first batch's mean
        part.update(x[rows], e[rows], heldout[rows], rows // 16, rows % 16)
        merged.merge(part)
    a, b = whole.fit(), merged.fit()
    assert torch.allclose(a.W, b.W, atol=1e-5) and torch.allclose(a.b, b.b, atol=1e-4)
    for key, value in a.metrics.items():
        assert b.metrics[key] == (value if value is None else pytest.approx(value, rel=1e-6, abs=1e-8)), key
    assert merged.fit_part.n + merged.score_part.n == len(x)


def test_merging_an_empty_state_changes_nothing():
    x, e, heldout = _data(n=50)
    state = LinearErrorStats(x.shape[1])
    state.update(x, e, heldout, torch.arange(len(x)) // 16, torch.arange(len(x)) % 16)
    before = state.fit().metrics
    state.merge(LinearErrorStats(x.shape[1]))
    assert state.fit().metrics == before


# --- streaming accumulators over latents ------------------------------------------------------------------------
D_SAE, POS = 12, 8


def _codes(n_contexts: int, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative codes ``[contexts, pos, d_sae]`` with a wide range of scales (histograms must grow)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(n_contexts, POS, D_SAE, generator=gen) * torch.logspace(-1, 2, D_SAE)
    codes[torch.rand(codes.shape, generator=gen) < 0.7] = 0
    codes[:, :, 0] = 0  # a dead latent
    codes[3, 2, 5] = codes[7, 4, 5] = codes[:, :, 5].max() + 1  # a tie for the top: the lower context id wins
    return codes


def _feed(stats, reservoirs, codes: torch.Tensor, first: int, batch: int = 5) -> None:
    from engine.precompute.accumulators import sparse_codes

    for lo in range(0, len(codes), batch):
        part = codes[lo : lo + batch]
        flat = part.reshape(-1, D_SAE)
        sparse = sparse_codes(flat, torch.ones(len(flat), dtype=torch.bool))
        if stats is not None:
            stats.update(sparse, len(flat), len(flat))
        if reservoirs is not None:
            reservoirs.update(sparse, torch.arange(first + lo, first + lo + len(part)))


def _reservoirs(seed: int, per_bin: int = 3):
    from engine.precompute.reservoirs import ExampleReservoirs

    return ExampleReservoirs(D_SAE, POS, top_k=4, n_bins=3, per_bin=per_bin, internal_bins=6, merge_contexts=10, seed=seed)


@pytest.mark.parametrize("cuts", [[20], [7, 33], [1, 2, 40]])
def test_feature_stats_merge_equals_one_stream(cuts):
    from engine.precompute.accumulators import FeatureStats

    codes = _codes(48)
    whole = FeatureStats(D_SAE, n_bins=16)
    _feed(whole, None, codes, 0)
    parts = []
    for rows in torch.tensor_split(torch.arange(len(codes)), cuts):
        parts.append(FeatureStats(D_SAE, n_bins=16))
        _feed(parts[-1], None, codes[rows], int(rows[0]))
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    a, b = whole.summary(), merged.summary()
    assert b.n_tokens == a.n_tokens
    for name in ("fire_count", "max_act", "density"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.allclose(a.mean_act, b.mean_act, rtol=1e-6)
    for ca, cb, ea, eb in zip(a.hist_counts, b.hist_counts, a.hist_edges, b.hist_edges, strict=True):
        assert np.array_equal(ca, cb) and np.array_equal(ea, eb)
    assert sum(len(c) for c in a.hist_counts) > D_SAE  # histograms really hold data


@pytest.mark.parametrize("cuts", [[20], [7, 33]])
def test_reservoir_merge_keeps_the_exact_top_k_and_full_quantile_bins(cuts):
    codes = _codes(48)
    whole = _reservoirs(seed=0)
    _feed(None, whole, codes, 0)
    parts = []
    for i, rows in enumerate(torch.tensor_split(torch.arange(len(codes)), cuts)):
        parts.append(_reservoirs(seed=100 + i))
        _feed(None, parts[-1], codes[rows], int(rows[0]))
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    a, b = whole.rows(), merged.rows()
    top_a, top_b = a.kind == 0, b.kind == 0
    for name in ("feature_id", "rank", "context_id", "max_pos", "max_act", "acts"):
        assert np.array_equal(getattr(a, name)[top_a], getattr(b, name)[top_b]), name
    assert b.context_id[(b.feature_id == 5) & top_b][0] == 3  # the tie went to the lower context id
    # every internal bin of the final range holds min(per_int, its population) items, in both
    for res in (whole, merged):
        live = res.key < float("inf")
        bins = (res.val[:, res.k :] * (res.n_int / res.hi.clamp_min(1e-30))[:, None]).floor().clamp(max=res.n_int - 1)
        context_max = codes.amax(1).T  # [d_sae, contexts]
        pop = (context_max[:, :, None] > 0) & ((context_max * (res.n_int / res.hi.clamp_min(1e-30))[:, None]).floor()
                                              .clamp(max=res.n_int - 1)[:, :, None] == torch.arange(res.n_int))
        for b_ in range(res.n_int):
            held = (live & (bins == b_)).sum(1)
            assert torch.equal(held, pop[:, :, b_].sum(1).clamp(max=res.per_int)), b_
    # quantile rows are real: each names a context where the latent reaches that maximum
    q = b.kind == 1
    assert q.any()
    for lat, ctx, value in zip(b.feature_id[q], b.context_id[q], b.max_act[q], strict=True):
        assert float(codes[ctx, :, lat].max()) == pytest.approx(float(value), rel=1e-6)


def test_merged_quantile_sample_is_uniform_over_both_sides():
    """One latent whose 20 contexts all fall in one bin, split 15 / 5 between two sides: after merging, each of the
    20 is kept with probability per_bin / 20 (a merge favouring one side would keep the 5 far more often)."""
    codes = torch.zeros(20, POS, D_SAE)
    codes[:, 0, 3] = 1.0 + torch.arange(20) * 1e-3  # one quantile bin; distinct values
    kept = np.zeros(20)
    trials = 300
    for t in range(trials):
        a, b = _reservoirs(seed=2 * t, per_bin=5), _reservoirs(seed=2 * t + 1, per_bin=5)
        _feed(None, a, codes[:15], 0)
        _feed(None, b, codes[15:], 15)
        a.merge(b)
        live = a.key[3] < float("inf")
        kept[a.ctx[3, a.k :][live].numpy()] += 1
    freq = kept / trials
    assert np.allclose(freq, 5 / 20, atol=0.09), freq
    assert abs(freq[15:].mean() - 0.25) < 0.05


def test_context_sample_merge_is_a_uniform_sample_of_the_union():
    from engine.precompute.sampling import HELDOUT_EVERY, ContextSample

    counts = np.zeros(60)
    trials = 300
    for t in range(trials):
        parts = []
        for lo, hi in ((0, 40), (40, 60)):  # held-out ids only: multiples of HELDOUT_EVERY
            s = ContextSample(3, 4, 2, seed=t * 7 + lo)
            ids = torch.arange(lo, hi) * HELDOUT_EVERY
            s.offer(ids, torch.zeros(len(ids), 4, dtype=torch.long), torch.ones(len(ids), 4, dtype=torch.bool),
                    torch.zeros(len(ids), 4, 2), torch.zeros(len(ids), 4, 2), torch.zeros(len(ids), 4, dtype=torch.long))
            parts.append(s)
        parts[0].merge(parts[1], np.random.default_rng(t))
        assert parts[0].seen == 60 and int((parts[0].context_id >= 0).sum()) == 3
        counts[(parts[0].context_id // HELDOUT_EVERY).numpy()] += 1
    assert abs(counts[40:].sum() / (3 * trials) - 20 / 60) < 0.06  # the smaller side's share
    assert counts.max() / trials < 3 / 60 + 0.06
