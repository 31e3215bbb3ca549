"""The training report's CE metrics count the tokens precompute counts (massive-activation tokens left out)."""

from __future__ import annotations

import pytest
import torch

import engine.train
from engine.precompute.corpus import iter_contexts
from engine.saes import SAEConfig, build_sae

from .test_independent_ce import BATCH, CTX, D_SAE, K, _capture, _counted, _hand_ce, _weights, corpus, lm  # noqa: F401

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
    real = engine.train.ce_metrics

    def spy(lm_, sae_, ids, mask, **kw):
        seen["ids"], seen["mask"] = ids, mask
        return real(lm_, sae_, ids, mask, **kw)

    monkeypatch.setattr(engine.train, "ce_metrics", spy)
    summary = engine.train.evaluate(lm, sae, HOOK, contexts, ce_contexts=16, batch=BATCH)
    ids = torch.tensor(contexts[:16])
    rule, n_massive = _counted(lm, HOOK, ids)  # precompute's rule, written out by hand
    loose, _ = _counted(lm, HOOK, ids, include_massive=True)
    assert n_massive > 0 and summary["massive_tokens"] >= n_massive  # the batch has massive tokens
    torch.testing.assert_close(seen["ids"], ids)
    assert torch.equal(seen["mask"].cpu(), rule) and not torch.equal(rule, loose)
    hand = _hand_ce(lm, HOOK, w, ids, rule)
    assert summary["n_predictions"] == hand["n_predictions"]
    for key in ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div"):
        assert summary[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
