"""Explained variance with and without massive-activation tokens, against a hand computation: the sums'
arithmetic on planted data, a precompute that counts the massive tokens, and the training report's evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.metrics import ReconStats, explained_variance, explained_variances
from engine.data.corpus import iter_contexts
from engine.precompute.pipeline import precompute
from engine.saes import SAEConfig, build_sae
from engine.train import evaluate

from .test_independent_ce import (  # noqa: F401
    BATCH,
    CTX,
    D_SAE,
    N_CONTEXTS,
    K,
    _capture,
    _counted,
    _hand_reconstruction,
    _weights,
    corpus,
    lm,
)

HOOK = "blocks.0.hook_resid_post"


def _ev(x: np.ndarray, x_hat: np.ndarray) -> float:
    """``1 - SSE / sum ||x - mean(x)||^2``, written out in float64."""
    return float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _stats(x: np.ndarray, x_hat: np.ndarray) -> ReconStats:
    out = ReconStats(x.shape[1])
    out.update(torch.from_numpy(x), torch.from_numpy(x_hat), n_active=0)
    return out


@pytest.mark.parametrize("count_massive", [False, True])
def test_both_variants_from_the_sums(count_massive):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (500, 16))  # a large mean: variance about zero would read much higher
    x[::97] *= 60  # massive tokens
    x_hat = x + rng.normal(0, 0.5, x.shape)
    x_hat[::97] = x[::97] * 0.9  # reconstructed relatively well, but carrying a large error
    massive = np.zeros(len(x), bool)
    massive[::97] = True
    stats = _stats(x, x_hat) if count_massive else _stats(x[~massive], x_hat[~massive])
    got = explained_variances(stats, _stats(x[massive], x_hat[massive]), count_massive)
    assert got["n_massive_tokens"] == massive.sum() == 6
    assert got["explained_variance_with_massive"] == pytest.approx(_ev(x, x_hat), rel=1e-12)
    assert got["explained_variance_without_massive"] == pytest.approx(_ev(x[~massive], x_hat[~massive]), rel=1e-12)
    assert abs(got["explained_variance_with_massive"] - got["explained_variance_without_massive"]) > 0.05
    assert stats.summary()["explained_variance"] == pytest.approx(
        got["explained_variance_with_massive" if count_massive else "explained_variance_without_massive"], rel=1e-12)
    # without the massive tokens' sums only the statistic tokens' variant is known
    alone = explained_variances(stats, None, count_massive)
    assert alone["n_massive_tokens"] is None
    assert (alone["explained_variance_with_massive"] is None) != count_massive
    assert explained_variance(_stats(x[:1], x_hat[:1])) != explained_variance(_stats(x[:1], x_hat[:1]))  # NaN: no variance


@pytest.fixture(scope="module")
def sae_w(lm, corpus):  # noqa: F811
    train = torch.tensor(list(iter_contexts(lm.tokenizer, corpus, CTX))[N_CONTEXTS : N_CONTEXTS + 32])
    mask, _ = _counted(lm, HOOK, train)
    w = _weights(_capture(lm, HOOK, train)[mask].float())
    return build_sae(SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=D_SAE, k=K, hook_name=HOOK), dict(w)), w


def _hand(lm, w, ids: torch.Tensor) -> dict:  # noqa: F811
    """EV with and without the massive tokens over ``ids`` (batches of ``BATCH``), by the hand counting rule."""
    strict, n_massive = _counted(lm, HOOK, ids)
    loose, _ = _counted(lm, HOOK, ids, include_massive=True)
    acts = _capture(lm, HOOK, ids).double()
    out: dict[str, float] = {"n_massive_tokens": n_massive}
    for key, mask in (("explained_variance_with_massive", loose), ("explained_variance_without_massive", strict)):
        x = acts[mask]
        out[key] = _ev(x.numpy(), _hand_reconstruction(x.float(), w).double().numpy())
    return out


def test_a_run_counting_the_massive_tokens_reports_both(lm, corpus, sae_w, tmp_path):  # noqa: F811
    sae, w = sae_w
    manifest = precompute(lm, sae, corpus, tmp_path / "run", context_len=CTX, batch_size=BATCH, tokens=N_CONTEXTS * CTX,
                          include_massive=True, sample_contexts=0, snapshot_tokens=0, progress=False)
    ids = torch.tensor(list(iter_contexts(lm.tokenizer, corpus, CTX))[:N_CONTEXTS])
    hand, metrics = _hand(lm, w, ids), manifest["metrics"]
    assert hand["n_massive_tokens"] >= 5 and metrics["n_massive_tokens"] == hand["n_massive_tokens"]
    for key in ("explained_variance_with_massive", "explained_variance_without_massive"):
        assert metrics[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    assert metrics["explained_variance"] == metrics["explained_variance_with_massive"]  # the statistic tokens here


def test_training_report_labels_both(lm, corpus, sae_w):  # noqa: F811
    sae, w = sae_w
    contexts = list(iter_contexts(lm.tokenizer, corpus, CTX))[:24]
    summary = evaluate(lm, sae, HOOK, contexts, ce_contexts=2, batch=BATCH)
    hand = _hand(lm, w, torch.tensor(contexts))
    assert summary["n_massive_tokens"] == hand["n_massive_tokens"] > 0
    for key in ("explained_variance_with_massive", "explained_variance_without_massive"):
        assert summary[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    assert summary["explained_variance"] == summary["explained_variance_with_massive"]


def test_the_massive_tokens_sums_merge_exactly_over_halves():
    """Two shards' states (statistic tokens and massive tokens, each over disjoint halves) merge into the state of
    every token: the same explained variances."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, (300, 8))
    x[::50] *= 40
    x_hat = x + rng.normal(0, 0.3, x.shape)
    massive = np.zeros(len(x), bool)
    massive[::50] = True

    def states(rows: slice) -> tuple[ReconStats, ReconStats]:
        xs, hs, ms = x[rows], x_hat[rows], massive[rows]
        return _stats(xs[~ms], hs[~ms]), _stats(xs[ms], hs[ms])

    whole = explained_variances(*states(slice(None)), False)
    (stats, big), (stats_b, big_b) = states(slice(0, 140)), states(slice(140, None))
    stats.merge(stats_b)
    big.merge(big_b)
    merged = explained_variances(stats, big, False)
    assert merged["n_massive_tokens"] == whole["n_massive_tokens"] == 6
    for key in ("explained_variance_with_massive", "explained_variance_without_massive"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-12) and merged[key] == pytest.approx(
            _ev(x, x_hat) if key.endswith("with_massive") else _ev(x[~massive], x_hat[~massive]), rel=1e-12)
