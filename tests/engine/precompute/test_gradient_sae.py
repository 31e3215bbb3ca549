"""Precompute on a g-SAE equals brute force: each context's forward and backward by hand, the selection in numpy."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.data.activations import stats_mask
from engine.precompute.pipeline import precompute
from engine.run.store import RunStore
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

CTX, BATCH, HOOK = 16, 4, "blocks.0.hook_resid_post"


def _by_hand(lm, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Activation and d(summed next-token loss)/d(activation) of one context, through an added zero vector."""
    delta = torch.zeros(1, ids.shape[1], lm.d_model, requires_grad=True)
    seen = {}

    def add(act):
        seen["x"] = act.detach().clone()
        return act + delta

    with torch.enable_grad(), lm.hooks.intervene(HOOK, add):
        logits = lm.model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
    return seen["x"][0].double().numpy(), grad[0].double().numpy()


def test_precompute_on_a_gradient_sae_equals_brute_force(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=10)
    sae = random_sae("gradient_topk", k=8, gradient_beta=20.0, hook=HOOK)
    manifest = precompute(tiny_llama, sae, corpus, tmp_path / "run", context_len=CTX, batch_size=BATCH,
                          tokens=CTX * 12, sample_contexts=2, progress=False)
    p = {n: t.detach().double().numpy() for n, t in sae.named_parameters()}
    ids = torch.tensor(pq.read_table(tmp_path / "run" / "contexts.parquet").sort_by("context_id")
                       .column("token_ids").to_pylist())
    mask = stats_mask(ids, tiny_llama.special_token_ids).numpy()
    codes = np.zeros((*ids.shape, sae.cfg.d_sae))
    gradient_only = np.zeros(sae.cfg.d_sae, dtype=np.int64)  # fired under the g-SAE rule, not under plain TopK
    plain_differs = 0
    for c in range(len(ids)):
        x, g = _by_hand(tiny_llama, ids[c : c + 1])
        assert np.abs(g[-1]).max() == 0  # the last position: no label, plain TopK
        for t in range(ids.shape[1]):
            pre = (x[t] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
            score = pre + 20.0 * pre * np.abs(p["W_dec"] @ g[t])
            keep = np.argsort(-score)[:8]
            codes[c, t, keep] = np.maximum(pre[keep], 0)
            plain = np.argsort(-pre)[:8]
            plain_differs += set(keep) != set(plain)
            if mask[c, t]:
                only = set(keep[pre[keep] > 0]) - set(plain[pre[plain] > 0])
                gradient_only[list(only)] += 1
    assert plain_differs > len(ids)  # the gradient changed the selection at many tokens
    codes[~mask] = 0
    rows = pq.read_table(tmp_path / "run" / "features.parquet").to_pylist()
    np.testing.assert_array_equal([r["fire_count"] for r in rows], (codes > 0).sum((0, 1)))
    np.testing.assert_allclose([r["max_act"] for r in rows], codes.max((0, 1)), rtol=1e-5, atol=1e-6)
    assert gradient_only.sum() > 0
    np.testing.assert_array_equal([r["gradient_only_count"] for r in rows], gradient_only)
    with RunStore.open(tmp_path / "run") as store:  # what the feature page and the Features table read
        np.testing.assert_array_equal(store.gradient_only_counts(), gradient_only)
        row = store.feature(int(gradient_only.argmax()))
        assert row is not None and row.gradient_only_count == gradient_only.max()
    assert manifest["metrics"]["n_tokens"] == int(mask.sum())
    assert manifest["metrics"]["l0"] == pytest.approx((codes > 0).sum() / mask.sum())
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())["sae"]
    assert saved["architecture"] == "gradient_topk" and "plain TopK" in saved["inference_rule"]
    assert "last position" in saved["gradient"]["fallback"]


def test_other_saes_have_no_gradient_only_counts(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=4)
    precompute(tiny_llama, random_sae("topk", k=8, hook=HOOK), corpus, tmp_path / "run", context_len=CTX,
               batch_size=BATCH, tokens=CTX * 4, sample_contexts=2, progress=False)
    assert pq.read_table(tmp_path / "run" / "features.parquet").column("gradient_only_count").null_count == 256  # D_SAE
    with RunStore.open(tmp_path / "run") as store:
        row = store.feature(0)
        assert store.gradient_only_counts() is None and row is not None and row.gradient_only_count is None
