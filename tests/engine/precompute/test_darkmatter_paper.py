"""The paper's dark-matter quantities (Engels et al.: fit without bias, R^2 averaged per dimension, ||e||^2 target,
random token split on (context, position), optional position range)
from streaming sums, against numpy and scikit-learn least squares on the same split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from engine.precompute.darkmatter import PAPER_HELDOUT_FRACTION, LinearErrorStats, parse_positions, token_split
from engine.precompute.pipeline import PrecomputeConfig


def _data(n: int = 4000, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations with a large mean (like the residual stream) and errors partly linear in them."""
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(n, d)) * gen.uniform(0.5, 3, size=d) + 20.0
    e = (x - 20) @ gen.normal(size=(d, d)) * 0.3 + 0.5 * np.tanh(x - 20) + gen.normal(size=(n, d)) * 0.3 + 1.0
    return x.astype(np.float32), e.astype(np.float32)


POS = 64
"""Token ``r`` of the planted data is at context ``r // POS``, position ``r % POS``."""


def _where(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.from_numpy(np.asarray(rows))
    return r // POS, r % POS


def _stream(x: np.ndarray, e: np.ndarray, rows: np.ndarray | None = None, chunk: int = 700,
            positions: tuple[int, int] | None = None) -> LinearErrorStats:
    stats = LinearErrorStats(x.shape[1], paper_positions=positions)
    rows = np.arange(len(x)) if rows is None else rows
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        stats.update(torch.from_numpy(x[r]), torch.from_numpy(e[r]), torch.from_numpy(r % 10 == 0), *_where(r))
    return stats


def independence_p(table: np.ndarray) -> float:
    """Pearson's chi-square test of independence of a 2x2 table (1 degree of freedom, no continuity correction)."""
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(chi2.sf(((table - expected) ** 2 / expected).sum(), 1))


def test_token_split_is_keyed_on_context_and_position_and_near_its_fraction():
    n = 40000
    ctx, pos = _where(np.arange(n))
    held = token_split(ctx, pos)
    assert abs(float(held.double().mean()) - PAPER_HELDOUT_FRACTION) < 0.012  # 5 standard deviations
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(token_split(ctx[perm], pos[perm]), held[perm])  # a function of each token's place alone
    assert torch.equal(torch.cat([token_split(ctx[:333], pos[:333]), token_split(ctx[333:], pos[333:])]), held)
    other = token_split(ctx, pos, seed=1)
    assert abs(float((other == held).double().mean()) - 0.5) < 0.012  # another seed, an independent split
    assert abs(float(token_split(ctx, pos, fraction=0.2).double().mean()) - 0.2) < 0.012
    # neighbours are independent: the 2x2 table of (position p, position p+1) sides passes a chi-square test
    grid = held.view(-1, POS)
    a, b = grid[:, :-1].reshape(-1).numpy(), grid[:, 1:].reshape(-1).numpy()
    table = np.array([[np.sum(~a & ~b), np.sum(~a & b)], [np.sum(a & ~b), np.sum(a & b)]])
    assert independence_p(table) > 1e-3
    # and so are the same position of consecutive contexts
    c, d = grid[:-1].reshape(-1).numpy(), grid[1:].reshape(-1).numpy()
    table = np.array([[np.sum(~c & ~d), np.sum(~c & d)], [np.sum(c & ~d), np.sum(c & d)]])
    assert independence_p(table) > 1e-3


def test_the_split_ignores_the_activation():
    """Two workers whose activations differ in the low bits put every token on the same side."""
    x, e = _data(n=2000)
    nudged = (torch.from_numpy(x).view(torch.int32) ^ 1).view(torch.float32).numpy()  # the last mantissa bit
    a, b = _stream(x, e).paper_metrics(), _stream(nudged, e).paper_metrics()
    assert a["paper_n_train_tokens"] == b["paper_n_train_tokens"]
    assert a["paper_heldout_norm_sq_r2"] == pytest.approx(b["paper_heldout_norm_sq_r2"], abs=1e-4)


def test_paper_positions_keep_only_those_tokens():
    x, e = _data()
    lo, hi = 3, 50
    got = _stream(x, e, positions=(lo, hi)).fit().metrics
    ctx, pos = _where(np.arange(len(x)))
    held = token_split(ctx, pos).numpy()
    kept = ((pos >= lo) & (pos <= hi)).numpy()
    fit, score = kept & ~held, kept & held
    assert got["paper_positions"] == [lo, hi]
    assert got["paper_n_train_tokens"] == fit.sum() and got["paper_n_heldout_tokens"] == score.sum()
    X, E = x.astype(np.float64), e.astype(np.float64)
    sq = (E**2).sum(1)
    w, *_ = np.linalg.lstsq(X[fit], sq[fit], rcond=None)
    norm_sq = 1 - ((sq[score] - X[score] @ w) ** 2).sum() / ((sq[score] - sq[score].mean()) ** 2).sum()
    assert got["paper_heldout_norm_sq_r2"] == pytest.approx(norm_sq, abs=1e-5)
    # the context-split quantities keep every token
    assert got["n_train_tokens"] + got["n_heldout_tokens"] == len(x)


def test_paper_positions_are_checked_against_the_context_length():
    assert parse_positions("1:1022") == (1, 1022) and parse_positions(None) is None
    assert PrecomputeConfig(context_len=1024, paper_positions="1:1022").paper_positions == "1:1022"
    with pytest.raises(ValueError, match="--context-len 1024 --paper-positions 1:1022"):
        PrecomputeConfig(context_len=128, paper_positions="1:1022")
    for bad in ("5", "a:b", "9:3", "-1:4"):
        with pytest.raises(ValueError, match="FIRST:LAST"):
            parse_positions(bad)
    with pytest.raises(ValueError, match="paper_positions"):
        LinearErrorStats(4, paper_positions=(1, 5)).merge(LinearErrorStats(4))


def test_paper_metrics_match_numpy_and_sklearn():
    x, e = _data()
    got = _stream(x, e).fit().metrics
    held = token_split(*_where(np.arange(len(x)))).numpy()
    fit, score = ~held, held
    assert got["paper_n_train_tokens"] == fit.sum() and got["paper_n_heldout_tokens"] == score.sum()
    sq = (e.astype(np.float64) ** 2).sum(1)
    X, E = x.astype(np.float64), e.astype(np.float64)
    W, *_ = np.linalg.lstsq(X[fit], E[fit], rcond=None)  # no bias column
    w, *_ = np.linalg.lstsq(X[fit], sq[fit], rcond=None)
    per_dim = 1 - ((E[score] - X[score] @ W) ** 2).sum(0) / ((E[score] - E[score].mean(0)) ** 2).sum(0)
    norm_sq = 1 - ((sq[score] - X[score] @ w) ** 2).sum() / ((sq[score] - sq[score].mean()) ** 2).sum()
    assert got["paper_heldout_error_r2_mean_dim"] == pytest.approx(per_dim.mean(), abs=1e-5)
    assert got["paper_heldout_norm_sq_r2"] == pytest.approx(norm_sq, abs=1e-5)
    model = LinearRegression(fit_intercept=False).fit(X[fit], E[fit])
    assert got["paper_heldout_error_r2_mean_dim"] == pytest.approx(
        r2_score(E[score], model.predict(X[score]), multioutput="uniform_average"), abs=1e-5)
    assert got["paper_train_error_r2_mean_dim"] == pytest.approx(
        r2_score(E[fit], model.predict(X[fit]), multioutput="uniform_average"), abs=1e-5)
    # the quantities differ from today's (intercept, pooled R^2, ||e||, context split): both are worth reporting
    assert abs(got["paper_heldout_error_r2_mean_dim"] - got["heldout_error_r2"]) > 1e-3


def test_paper_sums_merge_exactly_over_two_halves():
    x, e = _data(n=3000)
    whole = _stream(x, e).fit().metrics
    rows = np.random.default_rng(2).permutation(len(x))
    merged = _stream(x, e, rows[:1100], chunk=300)  # each half shifts by its own first batch's mean
    merged.merge(_stream(x, e, rows[1100:], chunk=500))
    got = merged.fit().metrics
    for key, value in whole.items():
        if key.startswith("paper_"):
            assert got[key] == (value if value is None else pytest.approx(value, rel=1e-6, abs=1e-8)), key
    assert merged.split_fit.n + merged.split_score.n == len(x)


def test_a_singular_fit_takes_the_minimum_norm_solution():
    """Fewer fitting tokens than dimensions (a short run): no error, the minimum-norm fit (exact on its tokens)."""
    x, e = _data(n=8, d=10)
    got = _stream(x, e).paper_metrics()
    assert 2 <= got["paper_n_train_tokens"] < 10
    assert got["paper_train_error_r2_mean_dim"] == pytest.approx(1.0, abs=1e-4)
