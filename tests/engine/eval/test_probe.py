"""Probes and sparse probing checked against scikit-learn and brute force: the logistic regression against
``LogisticRegression`` (plain, class-balanced, sample-weighted), SAEBench's top-k rule, its balanced tasks, F1."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from engine.eval.probe import accuracy, balanced_weights, f1, fit_logistic, top_k_mean_diff
from engine.eval.probing_data import Dataset
from engine.eval.sparse_probing import Pooled, ProbingConfig, means, probe_dataset, task_examples


def data(n=300, d=8, seed=0, imbalance=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d)
    y = (x @ rng.normal(size=d) / np.sqrt(d) + rng.normal(size=n) > imbalance).astype(int)
    return x, y


@pytest.mark.parametrize("case", ["plain", "balanced", "weighted"])
def test_logistic_regression_equals_scikit_learn(case):
    x, y = data(imbalance=0.8 if case == "balanced" else 0.0, seed=hash(case) % 100)
    C, weights, kwargs = 1.0, None, {}
    if case == "balanced":
        weights, kwargs = balanced_weights(y), {"class_weight": "balanced"}
    if case == "weighted":
        C, weights = 0.3, np.where(y == 1, 2.5, 1.0)
    ours = fit_logistic(x, y, C=C, sample_weight=weights)
    ref = LogisticRegression(C=C, max_iter=10000, tol=1e-12, **kwargs)
    ref.fit(x, y, sample_weight=weights if case == "weighted" else None)
    np.testing.assert_allclose(ours.coef, ref.coef_[0], atol=1e-5, rtol=1e-4)
    assert ours.intercept == pytest.approx(ref.intercept_[0], abs=1e-5)
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x))
    assert accuracy(ours, x, y) == pytest.approx(ref.score(x, y))


def test_balanced_weights_are_scikit_learns():
    y = np.array([1, 0, 0, 0, 1, 0])
    from sklearn.utils.class_weight import compute_sample_weight

    np.testing.assert_allclose(balanced_weights(y), compute_sample_weight("balanced", y))


def test_probe_refuses_one_class():
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(np.ones((4, 2)), np.zeros(4))


def test_top_k_mean_diff_and_f1():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 30)), rng.integers(0, 2, 50)
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    np.testing.assert_array_equal(top_k_mean_diff(x, y, 5), sorted(range(30), key=lambda i: -diff[i])[:5])
    pred = rng.integers(0, 2, 50)
    assert f1(pred, y) == pytest.approx(f1_score(y, pred))
    assert f1(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0


def test_tasks_are_balanced_against_the_other_classes():
    per_class = {"a": list(range(0, 30)), "b": list(range(100, 110)), "c": list(range(200, 260))}
    idx, y = task_examples(per_class, "a", np.random.default_rng(0))
    assert y.sum() == 30 and len(y) == 60
    neg = idx[y == 0]
    assert set(idx[y == 1]) == set(range(30))
    assert sum(100 <= n < 110 for n in neg) == 10 and sum(n >= 200 for n in neg) == 20  # b gives all 10 it has
    assert len(set(neg.tolist())) == 30


def test_sparse_probing_finds_the_latent_that_separates_the_classes():
    rng = np.random.default_rng(0)
    n = 240
    labels = np.repeat(["x", "y", "z"], n // 3)
    codes = np.abs(rng.normal(size=(n, 50))).astype(np.float32) * 0.1
    codes[labels == "y", 17] += 3.0  # latent 17 marks class y
    raw = rng.normal(size=(n, 6))
    raw[:, 2] += (labels == "y") * 4.0
    split = np.arange(n) % 4 == 0
    data = Dataset("toy", {c: list(np.nonzero((labels == c) & ~split)[0]) for c in "xyz"},
                   {c: list(np.nonzero((labels == c) & split)[0]) for c in "xyz"})
    rows = probe_dataset(data, Pooled(raw, codes, np.ones(n, dtype=np.int64)), ProbingConfig(ks=(1, 2)))
    y1 = next(r for r in rows if r.task == "toy/y" and r.metric == "sae_top_k_accuracy" and r.k == 1)
    assert y1.latents == [17] and y1.value == 1.0
    assert next(r for r in rows if r.task == "toy/y" and r.metric == "llm_accuracy").value > 0.95
    assert {r.task for r in rows} == {"toy/x", "toy/y", "toy/z"}
    summary = means(rows)
    overall = next(r for r in summary if r.task is None and r.metric == "sae_top_k_accuracy" and r.k == 1)
    per_task = [r.value for r in rows if r.metric == "sae_top_k_accuracy" and r.k == 1]
    assert overall.value == pytest.approx(np.mean(per_task)) and overall.n == 1
