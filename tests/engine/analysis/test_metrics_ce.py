"""The training report's CE metrics count the tokens precompute counts (massive-activation tokens left out);
the loss increase, its 95% interval, KL to the zero-ablated model and the KL score, against a hand computation."""

from __future__ import annotations

import pytest
import torch

import engine.train.sae
from engine.analysis.metrics import ce_metrics
from engine.data.corpus import iter_contexts
from engine.saes import SAEConfig, build_sae

from .test_independent_ce import (  # noqa: F401
    BATCH,
    CTX,
    D_SAE,
    HandHook,
    K,
    _capture,
    _counted,
    _hand_ce,
    _log_softmax64,
    _weights,
    corpus,
    lm,
)

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def sae_and_contexts(lm, corpus):  # noqa: F811
    contexts = list(iter_contexts(lm.tokenizer, corpus, CTX))[:24]
    ids = torch.tensor(contexts)
    mask, _ = _counted(lm, HOOK, ids)
    w = _weights(_capture(lm, HOOK, ids)[mask].float())
    sae = build_sae(SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=D_SAE, k=K, hook_name=HOOK), dict(w))
    return sae, w, contexts


def test_train_evaluate_scores_ce_where_precompute_does(lm, sae_and_contexts, monkeypatch):  # noqa: F811
    sae, w, contexts = sae_and_contexts
    seen = {}
    real = engine.train.sae.ce_metrics

    def spy(lm_, sae_, ids, mask, **kw):
        seen["ids"], seen["mask"] = ids, mask
        return real(lm_, sae_, ids, mask, **kw)

    monkeypatch.setattr(engine.train.sae, "ce_metrics", spy)
    summary = engine.train.sae.evaluate(lm, sae, HOOK, contexts, ce_contexts=16, batch=BATCH)
    ids = torch.tensor(contexts[:16])
    rule, n_massive = _counted(lm, HOOK, ids)  # precompute's rule, written out by hand
    loose, _ = _counted(lm, HOOK, ids, include_massive=True)
    assert n_massive > 0 and summary["n_massive_tokens"] >= n_massive  # the batch has massive tokens
    torch.testing.assert_close(seen["ids"], ids)
    assert torch.equal(seen["mask"].cpu(), rule) and not torch.equal(rule, loose)
    hand = _hand_ce(lm, HOOK, w, ids, rule)
    assert summary["n_predictions"] == hand["n_predictions"]
    for key in ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div"):
        assert summary[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    assert summary["ce_loss_increase"] == pytest.approx(hand["ce_loss_with_sae"] - hand["ce_loss_clean"], abs=1e-6)
    assert summary["ce_loss_increase_ci95"] > 0 and 0 < summary["kl_score"] <= 1


def _hand_kl_to_ablation(lm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: F811
    """KL(clean || activation zeroed at counted positions) per prediction ``[n, ctx-1]``, float64."""
    rows = []
    for row in range(len(ids)):
        one, keep = ids[row : row + 1], mask[row : row + 1, :, None]
        with HandHook(lm, HOOK) as hh, torch.no_grad():
            clean = _log_softmax64(lm.hf_model(input_ids=one).logits[0, :-1])
            hh.replace = lambda a, keep=keep: torch.where(keep, torch.zeros_like(a), a)
            zero = _log_softmax64(lm.hf_model(input_ids=one).logits[0, :-1])
        rows.append((clean.exp() * (clean - zero)).sum(-1))
    return torch.stack(rows)


def test_loss_increase_interval_and_kl_score_match_the_hand_computation(lm, sae_and_contexts):  # noqa: F811
    sae, w, contexts = sae_and_contexts
    ids = torch.tensor(contexts[:16])
    mask, _ = _counted(lm, HOOK, ids)
    got = ce_metrics(lm, sae, ids, mask, batch_size=5)  # batches that do not divide the contexts
    hand = _hand_ce(lm, HOOK, w, ids, mask)
    pred = hand["pred"]
    delta = (hand["rows"]["sae"] - hand["rows"]["clean"])[pred]
    n = len(delta)
    mean = float(delta.sum()) / n
    std = (sum((float(d) - mean) ** 2 for d in delta) / (n - 1)) ** 0.5
    kl_zero = float(_hand_kl_to_ablation(lm, ids, mask)[pred].mean())
    assert got.n_predictions == n
    assert got.ce_loss_increase == pytest.approx(hand["ce_loss_with_sae"] - hand["ce_loss_clean"], rel=1e-5, abs=1e-6)
    assert got.ce_loss_increase == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert got.ce_loss_increase_ci95 == pytest.approx(1.96 * std / n**0.5, rel=1e-4)
    assert got.kl_div_with_ablation == pytest.approx(kl_zero, rel=1e-5)
    assert got.kl_score == pytest.approx(1 - hand["kl_div"] / kl_zero, rel=1e-5)
    assert got.ce_loss_increase_ci95 is not None and got.ce_loss_increase_ci95 > 0 and kl_zero > hand["kl_div"] > 0
    new = {"ce_loss_increase", "ce_loss_increase_ci95", "kl_div_with_ablation", "kl_score"}
    assert set(got.to_dict(extended=True)) >= new and not set(got.to_dict()) & new  # to_dict(): older runs' six keys


def test_summaries_without_the_new_sums_leave_them_unknown():
    from engine.analysis.metrics import summarize_ce

    got = summarize_ce({"clean": 2.0, "sae": 2.5, "zero": 6.0, "kl": 0.3}, count=2)
    assert got.ce_loss_increase == pytest.approx(0.25) and got.ce_loss_recovered == pytest.approx(3.5 / 4)
    assert got.ce_loss_increase_ci95 is None and got.kl_div_with_ablation is None and got.kl_score is None
