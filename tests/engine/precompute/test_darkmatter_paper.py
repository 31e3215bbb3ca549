"""The paper's dark-matter quantities (Engels et al.: fit without bias, R^2 averaged per dimension, ||e||^2 target,
random token split) from streaming sums, against numpy and scikit-learn least squares on the same split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from engine.precompute.darkmatter import PAPER_HELDOUT_FRACTION, LinearErrorStats, token_split


def _data(n: int = 4000, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations with a large mean (like the residual stream) and errors partly linear in them."""
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(n, d)) * gen.uniform(0.5, 3, size=d) + 20.0
    e = (x - 20) @ gen.normal(size=(d, d)) * 0.3 + 0.5 * np.tanh(x - 20) + gen.normal(size=(n, d)) * 0.3 + 1.0
    return x.astype(np.float32), e.astype(np.float32)


def _stream(x: np.ndarray, e: np.ndarray, rows: np.ndarray | None = None, chunk: int = 700) -> LinearErrorStats:
    stats = LinearErrorStats(x.shape[1])
    rows = np.arange(len(x)) if rows is None else rows
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        stats.update(torch.from_numpy(x[r]), torch.from_numpy(e[r]), torch.from_numpy(r % 10 == 0))
    return stats


def test_token_split_is_seeded_per_token_and_near_its_fraction():
    x = torch.from_numpy(_data(n=20000)[0])
    held = token_split(x)
    assert abs(float(held.double().mean()) - PAPER_HELDOUT_FRACTION) < 0.015
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert torch.equal(token_split(x[perm]), held[perm])  # a function of each token alone
    assert torch.equal(torch.cat([token_split(x[:333]), token_split(x[333:])]), held)
    other = token_split(x, seed=1)
    assert 0.4 < float((other == held).double().mean()) < 0.6  # another seed, another (independent) split
    assert abs(float(token_split(x, fraction=0.2).double().mean()) - 0.2) < 0.015


def test_paper_metrics_match_numpy_and_sklearn():
    x, e = _data()
    got = _stream(x, e).fit().metrics
    held = token_split(torch.from_numpy(x)).numpy()
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
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-8), key
    assert merged.split_fit.n + merged.split_score.n == len(x)


def test_a_singular_fit_takes_the_minimum_norm_solution():
    """Fewer fitting tokens than dimensions (a short run): no error, the minimum-norm fit (exact on its tokens)."""
    x, e = _data(n=8, d=10)
    got = _stream(x, e).paper_metrics()
    assert 2 <= got["paper_n_train_tokens"] < 10
    assert got["paper_train_error_r2_mean_dim"] == pytest.approx(1.0, abs=1e-4)
