"""Head attribution in precompute: stored head shares and top-example DFA against a hand formula and live ``dfa``;
the pass's statistics unchanged by it; residual runs, older runs and one-head SAEs."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.analysis.dfa import dfa, dfa_from_capture, dfa_pairs
from engine.model.attention import capture_attention
from engine.precompute.pipeline import precompute
from engine.run.store import RunStore
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

CTX, BATCH, TOP_K = 16, 4, 4
HOOK = "blocks.1.attn.hook_z"


def _attn_sae(lm, **cfg):
    return random_sae("topk", d_in=lm.n_heads * lm.d_head, hook=HOOK, reshape_activations="hook_z", seed=3, **cfg)


def _precompute(lm, sae, root, name, **options):
    out = root / name
    manifest = precompute(lm, sae, root / "corpus.jsonl", out, context_len=CTX, batch_size=BATCH, top_k=TOP_K,
                          sample_contexts=4, progress=False, **options)
    return out, manifest


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    write_corpus(root / "corpus.jsonl", n_docs=30)
    return root


@pytest.fixture(scope="module", params=[6, 40], ids=["sources6", "sources40"])
def attn_run(request, tiny_llama, root):
    """An attn.hook_z run keeping 6 (fewer than a destination has) or 40 (more than early ones have) sources."""
    sae = _attn_sae(tiny_llama)
    out, manifest = _precompute(tiny_llama, sae, root, f"attn{request.param}", dfa_sources=request.param)
    return {"out": out, "manifest": manifest, "sae": sae, "n": request.param}


def _top_pairs(store, n_latents):
    for latent in range(n_latents):
        for example, attribution in zip(store.examples(latent, "top"), store.attribution(latent), strict=True):
            yield latent, example, attribution


def test_weight_shares_are_each_heads_share_of_the_decoder_norm(attn_run, tiny_llama):
    sae, lm = attn_run["sae"], tiny_llama
    blocks = sae.W_dec.detach().view(sae.cfg.d_sae, lm.n_heads, lm.d_head).double().pow(2).sum(-1)
    expected = (blocks / blocks.sum(-1, keepdim=True)).numpy()
    stored = np.array(pq.read_table(attn_run["out"] / "features.parquet").column("head_weight_shares").to_pylist())
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-7)
    # Kissane et al.'s share (top_feature_analysis.py): unsquared block norms over their sum
    norms = sae.W_dec.detach().view(sae.cfg.d_sae, lm.n_heads, lm.d_head).double().norm(dim=-1)
    kissane = (norms / norms.sum(-1, keepdim=True)).numpy()
    with RunStore.open(attn_run["out"]) as store:
        rows = [store.feature(i) for i in (0, 5, 17)]
        derived = np.array([row.head_norm_shares for row in rows if row is not None])
    np.testing.assert_allclose(derived, kissane[[0, 5, 17]], rtol=1e-5, atol=1e-7)
    assert not np.allclose(derived, expected[[0, 5, 17]], atol=1e-3)  # the two shares differ on this SAE
    head = attn_run["manifest"]["head_attribution"]
    assert head["layer"] == 1 and head["n_heads"] == lm.n_heads and head["dfa"] and head["sources_per_example"] == attn_run["n"]
    assert attn_run["manifest"]["sae"]["hook_head_index"] is None


def test_every_top_example_has_its_attribution(attn_run):
    examples = pq.read_table(attn_run["out"] / "examples.parquet").to_pylist()
    rows = pq.read_table(attn_run["out"] / "attribution.parquet").to_pylist()
    top = [(e["feature_id"], e["rank"], e["context_id"], e["max_pos"]) for e in examples if e["kind"] == "top"]
    assert [(r["feature_id"], r["rank"], r["context_id"], r["max_pos"]) for r in rows] == top
    assert len(top) > 100


def test_stored_dfa_equals_live_dfa_at_the_max_token(attn_run, tiny_llama):
    lm, sae, n = tiny_llama, attn_run["sae"], attn_run["n"]
    captures = {}
    with RunStore.open(attn_run["out"]) as store:
        pairs = list(_top_pairs(store, sae.cfg.d_sae))
        for i, (latent, example, row) in enumerate(pairs):
            assert (row.rank, row.context_id, row.max_pos) == (example.rank, example.context_id, example.max_pos)
            tokens = store.context(example.context_id).token_ids
            if i % 25 == 0:  # the live path end to end: a forward of the prefix up to the max token
                live = dfa(lm, sae, tokens, latent, example.max_pos)
            else:
                if example.context_id not in captures:
                    captures[example.context_id] = capture_attention(lm, 1, [tokens])
                live = dfa_from_capture(sae, captures[example.context_id], latent, example.max_pos)
            flat = live.contributions.flatten().double()  # [head * (max_pos + 1) + source]
            kept = min(n, len(flat))
            order = flat.abs().argsort(descending=True)[:kept]
            width = example.max_pos + 1
            assert row.dfa_heads == (order // width).tolist() and row.dfa_sources == (order % width).tolist()
            np.testing.assert_allclose(row.dfa_values, flat[order].numpy(), rtol=1e-4, atol=1e-5)
            assert row.dfa_rest == pytest.approx(float(flat.sum() - flat[order].sum()), abs=1e-4)
            assert row.dfa_bias == pytest.approx(live.bias, abs=1e-5)
            assert row.pre() == pytest.approx(live.pre, abs=1e-4)  # kept + rest + bias = the pre-activation
            assert sum(row.dfa_values) + row.dfa_rest == pytest.approx(live.pre - live.bias, abs=1e-4)
            np.testing.assert_allclose(row.head_terms, live.by_head().numpy(), rtol=1e-4, atol=1e-5)
            assert live.activation == pytest.approx(example.max_act, rel=1e-4, abs=1e-5)


def test_data_shares_are_the_top_examples_head_split(attn_run, tiny_llama):
    lm, sae, out = tiny_llama, attn_run["sae"], attn_run["out"]
    contexts = {r["context_id"]: r["token_ids"] for r in pq.read_table(out / "contexts.parquet").to_pylist()}
    top = [e for e in pq.read_table(out / "examples.parquet").to_pylist() if e["kind"] == "top"]
    sums, zs = np.zeros((sae.cfg.d_sae, lm.n_heads)), {}
    for example in top:
        context, latent = example["context_id"], example["feature_id"]
        if context not in zs:  # the hook's activations, from a plain forward
            zs[context] = lm.capture(torch.tensor([contexts[context]]), HOOK)[HOOK][0]
        # by hand: each head's block of z at the max token through the latent's encoder column (pre - bias, split)
        x = zs[context][example["max_pos"]].reshape(lm.n_heads, lm.d_head)
        sums[latent] += (x * sae.W_enc[:, latent].view(lm.n_heads, lm.d_head)).sum(-1).double().numpy()
    stored = pq.read_table(out / "features.parquet").column("head_data_shares").to_pylist()
    fired = {e["feature_id"] for e in top}
    for latent, shares in enumerate(stored):
        if latent not in fired:
            assert shares is None
            continue
        np.testing.assert_allclose(shares, sums[latent] / sums[latent].sum(), rtol=1e-3, atol=1e-4)
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert 0 < len(fired) < sae.cfg.d_sae  # some latents without examples: null shares


def test_head_attribution_leaves_the_pass_unchanged(attn_run, tiny_llama, root):
    """The attention capture feeds the SAE the hook's exact values: statistics and examples equal a run without it."""
    out, manifest = _precompute(tiny_llama, attn_run["sae"], root, f"attn_off{attn_run['n']}", dfa_sources=0)
    assert manifest["head_attribution"] == {"layer": 1, "n_heads": tiny_llama.n_heads, "dfa": False,
                                            "reason": "turned off (dfa_sources = 0)"}
    for name in ("features", "examples"):
        on = pq.read_table(attn_run["out"] / f"{name}.parquet").drop_columns(["head_data_shares"] if name == "features" else [])
        off = pq.read_table(out / f"{name}.parquet").drop_columns(["head_data_shares"] if name == "features" else [])
        assert on.equals(off), name
    assert pq.read_table(out / "attribution.parquet").num_rows == 0
    assert pq.read_table(out / "features.parquet").column("head_data_shares").null_count == attn_run["sae"].cfg.d_sae


def test_residual_runs_have_no_head_attribution_and_older_runs_open(tiny_llama, root, tmp_path):
    out, manifest = _precompute(tiny_llama, random_sae("topk", hook="blocks.1.hook_resid_post"), root, "resid")
    assert manifest["head_attribution"] is None
    features = pq.read_table(out / "features.parquet")
    assert features.column("head_weight_shares").null_count == features.column("head_data_shares").null_count == 256
    assert pq.read_table(out / "attribution.parquet").num_rows == 0
    with RunStore.open(out) as store:
        live = next(i for i in range(256) if store.examples(i, "top"))
        assert store.attribution(live) == [] and store.feature(live).head_weight_shares is None
    # a run written before head attribution: no columns, no attribution.parquet, an index of the previous version
    old = tmp_path / "old"
    shutil.copytree(out, old)
    pq.write_table(features.drop_columns(["head_weight_shares", "head_data_shares"]), old / "features.parquet")
    (old / "attribution.parquet").unlink()
    with RunStore.open(old) as store:
        row = store.feature(live)
        assert row.head_weight_shares is None and row.head_data_shares is None and row.examples
        assert store.attribution(live) == []


def test_one_head_sae_precomputes_with_its_head(tiny_llama, root):
    lm, head = tiny_llama, 2
    sae = random_sae("topk", d_in=lm.d_head, hook=HOOK, hook_head_index=head, seed=4)
    out, manifest = _precompute(lm, sae, root, "onehead", dfa_sources=5)
    assert manifest["sae"]["hook_head_index"] == head and manifest["head_attribution"]["dfa"]
    with RunStore.open(out) as store:
        row = store.feature(next(i for i in range(256) if store.examples(i, "top")))
        assert row.head_weight_shares == [0.0, 0.0, 1.0, 0.0] and row.head_data_shares == pytest.approx([0, 0, 1, 0])
        for latent, example, attribution in list(_top_pairs(store, 256))[:40]:
            assert set(attribution.dfa_heads) == {head}
            tokens = store.context(example.context_id).token_ids
            live = dfa_pairs(sae, capture_attention(lm, 1, [tokens]), [latent], [example.max_pos])
            values = live.contributions[0, head, : example.max_pos + 1]
            order = values.abs().argsort(descending=True)[:5]
            assert attribution.dfa_sources == order.tolist()
            np.testing.assert_allclose(attribution.dfa_values, values[order].numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["l0"] == pytest.approx(8.0)  # TopK k=8 on one head


def test_attention_logit_effects_go_through_the_output_projection(attn_run, tiny_llama):
    lm, sae = tiny_llama, attn_run["sae"]
    o_proj = lm.model.model.layers[1].self_attn.o_proj.weight.detach()  # llama: z @ W_O^T, no bias
    logits = (sae.W_dec.detach() @ o_proj.T * lm.final_norm_scale()) @ lm.unembed_matrix().detach().T
    stored = pq.read_table(attn_run["out"] / "features.parquet").to_pylist()
    for latent in (0, 7, 100):
        assert stored[latent]["top_logit_ids"] == logits[latent].topk(10).indices.tolist()
        np.testing.assert_allclose(stored[latent]["top_logit_values"], logits[latent].topk(10).values.numpy(), rtol=1e-4)
        assert stored[latent]["bottom_logit_ids"] == logits[latent].topk(10, largest=False).indices.tolist()
