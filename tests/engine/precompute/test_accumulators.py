"""Streaming accumulators against brute force on random data: histograms across range doublings, reservoirs,
the linear error map's closed-form R^2."""

import numpy as np
import pytest
import torch

from engine.precompute.accumulators import FeatureStats, pow2_above, sparse_codes
from engine.precompute.darkmatter import LinearErrorStats
from engine.precompute.reservoirs import ExampleReservoirs


def _batches(n_batches=30, batch=4, pos=6, d=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_batches):  # the scale grows, so histogram ranges double many times
        codes = torch.relu(torch.randn(batch, pos, d, generator=gen) * (1 + i) ** 1.5 - 0.8)
        codes[:, 0] = 0
        yield codes


def test_pow2_above_is_strict_and_exact():
    x = torch.tensor([0.0, 0.3, 0.5, 1.0, 3.0, 4.0, 1e-20, 7e30])
    assert pow2_above(x).tolist() == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 2.0**-66, 2.0**103]


def test_feature_stats_match_brute_force():
    stats = FeatureStats(7, n_bins=8)
    all_codes = []
    for codes in _batches():
        flat = codes.reshape(-1, 7)
        l0 = stats.update(sparse_codes(flat, torch.ones(len(flat), dtype=torch.bool)), len(flat), len(flat))
        assert l0.tolist() == (flat > 0).sum(1).tolist()
        all_codes.append(flat)
    flat = torch.cat(all_codes)
    out = stats.summary()
    for latent in range(7):
        acts = flat[:, latent][flat[:, latent] > 0].numpy()
        assert out.fire_count[latent] == len(acts)
        assert out.max_act[latent] == acts.max()
        assert out.mean_act[latent] == pytest.approx(acts.mean(), rel=1e-5)
        counts, _ = np.histogram(acts, bins=out.hist_edges[latent])
        np.testing.assert_array_equal(counts, out.hist_counts[latent])
        assert 4 <= len(out.hist_counts[latent]) <= 8  # trimmed above the maximum's bin
    np.testing.assert_allclose(out.density, out.fire_count / flat.shape[0])


def test_reservoirs_top_exact_and_quantiles_in_their_bins():
    res = ExampleReservoirs(7, 6, top_k=5, n_bins=4, per_bin=2, internal_bins=8)
    seen = []
    for i, codes in enumerate(_batches()):
        codes = codes.bfloat16()  # like an SAE run in bf16
        mask = torch.ones(codes.shape[:2], dtype=torch.bool)
        mask[:, 0] = False
        res.update(sparse_codes(codes.reshape(-1, 7), mask.reshape(-1)), torch.arange(i * 4, i * 4 + 4))
        seen.append(codes.float())
    codes = torch.cat(seen)
    cmax = codes.amax(1)
    rows = res.rows()
    assert res.acts.shape == (7, 5 + 8 * 2, 6)  # fixed, whatever the number of batches
    for latent in range(7):
        values = cmax[:, latent].numpy()
        want = [c for c in np.argsort(-values, kind="stable")[:5] if values[c] > 0]
        top = (rows.feature_id == latent) & (rows.kind == 0)
        assert rows.context_id[top].tolist() == want
        for ctx, acts in zip(rows.context_id[top], rows.acts[top], strict=True):
            np.testing.assert_allclose(acts, codes[ctx, :, latent].numpy(), rtol=1e-3, atol=1e-6)
        q = (rows.feature_id == latent) & (rows.kind == 1)
        peak = values.max()
        for ctx, b, value in zip(rows.context_id[q], rows.quantile_bin[q], rows.max_act[q], strict=True):
            assert value == values[ctx] and b == min(int(value / peak * 4), 3)
        assert np.bincount(rows.quantile_bin[q], minlength=4).max() <= 2
        assert 3 in rows.quantile_bin[q]


def test_linear_error_map_closed_form_r2():
    gen = np.random.default_rng(0)
    n, d = 6000, 12
    x = gen.normal(size=(n, d)) * gen.uniform(0.5, 3, size=d) + 50.0  # a large mean, like the residual stream
    A = gen.normal(size=(d, d)) * 0.3
    e = (x - 50) @ A + 0.5 * np.tanh(x - 50) + gen.normal(size=(n, d)) * 0.2
    held = np.arange(n) % 10 == 0
    stats = LinearErrorStats(d)
    for start in range(0, n, 700):
        sl = slice(start, start + 700)
        rows = torch.arange(n)[sl]
        stats.update(torch.tensor(x[sl], dtype=torch.float32), torch.tensor(e[sl], dtype=torch.float32), torch.tensor(held[sl]),
                     rows // 64, rows % 64)
    fit = stats.fit()
    X = np.hstack([x, np.ones((n, 1))])
    coef, *_ = np.linalg.lstsq(X[~held], e[~held], rcond=None)
    pred = X[held] @ coef
    r2 = 1 - ((e[held] - pred) ** 2).sum() / ((e[held] - e[held].mean(0)) ** 2).sum()
    assert fit.metrics["heldout_error_r2"] == pytest.approx(r2, abs=1e-3)
    np.testing.assert_allclose(fit.W.numpy(), coef[:d], atol=2e-3)
    linear, nonlinear = fit.split(torch.tensor(x[held], dtype=torch.float32), torch.tensor(e[held], dtype=torch.float32))
    np.testing.assert_allclose(linear.numpy(), pred, atol=5e-3)
    np.testing.assert_allclose((linear + nonlinear).numpy(), e[held], atol=1e-5)
    norm = np.linalg.norm(e, axis=1)
    ncoef, *_ = np.linalg.lstsq(X[~held], norm[~held], rcond=None)
    nr2 = 1 - ((norm[held] - X[held] @ ncoef) ** 2).sum() / ((norm[held] - norm[held].mean()) ** 2).sum()
    assert fit.metrics["heldout_norm_r2"] == pytest.approx(nr2, abs=1e-3)


def test_reservoir_payload_follows_its_top_items_across_merges():
    """Payloads computed for ``top_candidates`` only (ties included: values on a coarse grid) land in the slots of
    exactly the top items, at their max position; buffering several batches per merge changes nothing."""
    d, pos = 7, 6
    spec = {"tag": ((2,), torch.float32)}
    res = ExampleReservoirs(d, pos, top_k=3, n_bins=4, per_bin=2, internal_bins=8, merge_contexts=12, payload=spec)
    plain = ExampleReservoirs(d, pos, top_k=3, n_bins=4, per_bin=2, internal_bins=8, merge_contexts=12)
    offered = 0
    for i, codes in enumerate(_batches()):
        codes = (codes * 2).round() / 2  # ties between contexts and within one
        mask = torch.ones(codes.shape[:2], dtype=torch.bool)
        mask[:, 0] = False
        sparse = sparse_codes(codes.reshape(-1, d), mask.reshape(-1))
        ids = torch.arange(i * 4, i * 4 + 4)
        found = res.top_candidates(sparse, len(ids))
        offered += len(found.latent)
        tag = torch.stack([(ids[found.row] * 100 + found.latent).float(), found.pos.float()], 1)
        res.update(sparse, ids, {"tag": tag})
        plain.update(sparse, ids)
    rows, ref = res.rows(), plain.rows()
    for name in ("feature_id", "kind", "rank", "context_id", "max_pos", "max_act"):
        np.testing.assert_array_equal(getattr(rows, name), getattr(ref, name))
    top = rows.kind == 0
    assert rows.payload is not None
    np.testing.assert_array_equal(rows.payload["tag"][top, 0], rows.context_id[top] * 100 + rows.feature_id[top])
    np.testing.assert_array_equal(rows.payload["tag"][top, 1], rows.max_pos[top])
    n_firing = sum(int((c.amax(1) > 0).sum()) for c in _batches())
    assert offered < n_firing / 2  # candidates only, not every firing (latent, context)
    with pytest.raises(ValueError, match="payload"):
        res.update(sparse, ids)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_windowed_reservoirs_keep_the_whole_rows_slice_around_the_maximum(window):
    """Same items, same draws as whole contexts; each keeps ``window`` positions starting at clamp(max_pos -
    before, 0, pos - window), its activations equal to the whole row's there; state round trips and merges keep it."""
    d, pos = 7, 6
    whole = ExampleReservoirs(d, pos, top_k=4, n_bins=4, per_bin=2, internal_bins=8, seed=3)
    win = ExampleReservoirs(d, pos, top_k=4, n_bins=4, per_bin=2, internal_bins=8, seed=3, window=window)
    halves = [ExampleReservoirs(d, pos, top_k=4, n_bins=4, per_bin=2, internal_bins=8, seed=s, window=window)
              for s in (5, 6)]
    halves_whole = [ExampleReservoirs(d, pos, top_k=4, n_bins=4, per_bin=2, internal_bins=8, seed=s) for s in (5, 6)]
    for i, codes in enumerate(_batches()):
        mask = torch.ones(codes.shape[:2], dtype=torch.bool)
        mask[:, 0] = False
        sparse = sparse_codes(codes.reshape(-1, d), mask.reshape(-1))
        ids = torch.arange(i * 4, i * 4 + 4)
        for res in (whole, win, halves[i % 2], halves_whole[i % 2]):
            res.update(sparse, ids)
    assert win.acts.shape == (d, 4 + 8 * 2, window)
    before = window - window // 4 - 1
    halves[0].merge(ExampleReservoirs(d, pos, top_k=4, n_bins=4, per_bin=2, internal_bins=8,
                                      window=window).load_state(halves[1].state_dict()))
    halves_whole[0].merge(halves_whole[1])
    for ref, got in ((whole.rows(), win.rows()), (halves_whole[0].rows(), halves[0].rows())):
        for name in ("feature_id", "kind", "rank", "quantile_bin", "context_id", "max_pos", "max_act"):
            np.testing.assert_array_equal(getattr(ref, name), getattr(got, name))
        expected_start = np.clip(ref.max_pos.astype(int) - before, 0, pos - window)
        np.testing.assert_array_equal(got.start, expected_start)
        np.testing.assert_array_equal(ref.start, 0)
        sliced = np.take_along_axis(ref.acts, expected_start[:, None] + np.arange(window), 1)
        np.testing.assert_array_equal(got.acts, sliced)
        # the maximum is inside every window and carries max_act
        at_max = got.acts[np.arange(len(got.acts)), got.max_pos - got.start]
        np.testing.assert_allclose(at_max, got.max_act, rtol=1e-3)
    with pytest.raises(ValueError, match="example windows"):
        ExampleReservoirs(d, pos, window=window + 1).load_state(win.state_dict())
