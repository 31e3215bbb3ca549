"""Per-layer transcoders trained on every layer in one pass: they learn, the report's numbers are what they say,
an interrupted run resumes to exactly the weights of an uninterrupted one, and bad settings are refused."""

import json

import numpy as np
import pytest
import torch

from engine.model.hooks import interventions
from engine.saes.transcoders import load_transcoders
from engine.train.transcoders import TranscoderTrainConfig, parse_layers, train_transcoders


def _cfg(tiny_corpus, **kw):
    base = dict(corpus=str(tiny_corpus), width=128, k=8, tokens=24_576, context_len=64, batch_size=512, buffer_tokens=2048,
                eval_contexts=8, ce_contexts=4, lr=1e-2, checkpoint_every=2)
    return TranscoderTrainConfig(**{**base, **kw})


def test_learns_and_reports_what_it_measures(tiny_llama, tiny_corpus, tmp_path):
    report = train_transcoders(tiny_llama, _cfg(tiny_corpus), tmp_path / "tc", progress=False)
    assert not report["partial"] and report["tokens_seen"] == 24_576
    first, last = report["log"][0]["explained_variance"], report["log"][-1]["explained_variance"]
    assert all(b > a + 0.2 for a, b in zip(first, last, strict=True)), (first, last)
    tcs = load_transcoders(tmp_path / "tc")
    assert sorted(tcs) == [0, 1] and all(t.k == 8 and t.d_sae == 128 for t in tcs.values())
    held = report["heldout"]
    # the all-spliced CE loss, recomputed here with the stored (fp16) transcoders spliced by hand
    ids = torch.tensor(_contexts(tiny_llama, tiny_corpus)[:4])
    stash = {}
    pairs = [(f"blocks.{L}.ln2.hook_normalized", lambda a, L=L: stash.__setitem__(L, a)) for L in (0, 1)]
    pairs += [(f"blocks.{L}.hook_mlp_out", lambda a, L=L: tcs[L](stash[L])[0].to(a.dtype)) for L in (0, 1)]
    with interventions(tiny_llama.hooks, pairs):
        logits = tiny_llama.model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert held["ce_all_spliced"] == pytest.approx(float(ce), rel=1e-4)
    rec = (held["ce_all_zero_ablated"] - held["ce_all_spliced"]) / (held["ce_all_zero_ablated"] - held["ce_clean"])
    assert held["ce_loss_recovered_all"] == pytest.approx(rec)
    for layer in ("0", "1"):
        assert 0.3 < held["layers"][layer]["explained_variance"] <= 1 and held["layers"][layer]["l0"] <= 8
    assert not (tmp_path / "tc" / ".checkpoint").exists() or json.loads(
        (tmp_path / "tc" / ".checkpoint" / "progress.json").read_text())["seen"] <= 24_576


def _contexts(lm, corpus):
    from engine.data.corpus import iter_contexts

    return list(iter_contexts(lm.tokenizer, str(corpus), 64))[:8]  # the held-out contexts (the first 8)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_llama, tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, tokens=8192, eval_contexts=4, ce_contexts=2)
    train_transcoders(tiny_llama, cfg, tmp_path / "whole", progress=False)
    part = train_transcoders(tiny_llama, cfg, tmp_path / "split", progress=False, stop_after_steps=5)
    assert part["partial"] and 0 < part["tokens_seen"] < 8192
    assert json.loads((tmp_path / "split" / "training_report.json").read_text())["partial"]
    assert load_transcoders(tmp_path / "split")[1].k == 8  # the partial export is loadable
    done = train_transcoders(tiny_llama, cfg, tmp_path / "split", progress=False)
    assert not done["partial"] and done["steps"] == 16
    a, b = load_transcoders(tmp_path / "whole"), load_transcoders(tmp_path / "split")
    for layer in (0, 1):
        np.testing.assert_array_equal(a[layer].W_enc.numpy(), b[layer].W_enc.numpy())
        np.testing.assert_array_equal(a[layer].W_dec.numpy(), b[layer].W_dec.numpy())
    more = train_transcoders(tiny_llama, _cfg(tiny_corpus, tokens=10_240, eval_contexts=4, ce_contexts=2), tmp_path / "split",
                             progress=False)  # a longer budget goes on from the finished run's checkpoint
    assert not more["partial"] and more["tokens_seen"] == 10_240 and more["steps"] == 20
    with pytest.raises(ValueError, match="checkpoint of other settings"):
        train_transcoders(tiny_llama, _cfg(tiny_corpus, tokens=8192, eval_contexts=4, ce_contexts=2, k=4),
                          tmp_path / "split", progress=False, stop_after_steps=1)


def test_refusals():
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("0-1,2", 3) == [0, 1, 2] and parse_layers("2", 3) == [2]
    with pytest.raises(ValueError, match="outside this model's layers 0-2"):
        parse_layers("1-5", 3)
    with pytest.raises(ValueError, match="cannot read"):
        parse_layers("x", 3)
    with pytest.raises(ValueError, match="--k must satisfy"):
        TranscoderTrainConfig(corpus="c", width=8, k=8, tokens=10)
