"""Decoder neighbours at scale: exact up to ``neighbors_exact_max`` (brute force in numpy), an IVF search beyond it
whose recall@n in the manifest equals a brute-force recount on the run's own neighbour columns."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.precompute.features import latent_neighbors
from engine.precompute.pipeline import precompute
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae


def _brute(sae, n: int) -> np.ndarray:
    w = sae.W_dec.detach().double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    sims = w @ w.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :n]


def test_exact_at_and_below_the_threshold_equals_brute_force():
    sae = random_sae("topk", d_sae=256)
    got = latent_neighbors(sae, 10, exact_max=256)
    assert got.info == {"method": "exact", "n": 10, "exact_max": 256}
    assert np.array_equal(got.ids, _brute(sae, 10))


def test_a_wide_run_uses_ivf_and_its_manifest_recall_is_a_brute_force_recount(tiny_llama, tmp_path):
    sae = random_sae("topk", d_sae=256, hook="blocks.1.hook_resid_post")
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=8)
    manifest = precompute(tiny_llama, sae, corpus, tmp_path / "run", context_len=16, batch_size=8, progress=False,
                          neighbors_exact_max=128, neighbors_probe=4, snapshot_tokens=0)
    info = manifest["neighbors"]
    assert info["method"] == "ivf" and info["n_lists"] == 32 and info["n_probe"] == 4
    assert info["recall_sample"] == 256  # all latents: fewer than the sample size
    table = pq.read_table(tmp_path / "run" / "features.parquet").sort_by("feature_id")
    ids = np.array(table.column("neighbor_ids").to_pylist())
    exact = _brute(sae, 10)
    recount = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact, strict=True)])
    assert info["recall_at_n"] == pytest.approx(recount, abs=1e-4)
    assert recount < 1.0  # 4 of 32 lists: really approximate


def test_a_run_wider_than_logits_on_demand_above_stores_no_logit_effects(tiny_llama, tmp_path):
    sae = random_sae("topk", d_sae=256, hook="blocks.1.hook_resid_post")
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=4)
    manifest = precompute(tiny_llama, sae, corpus, tmp_path / "run", context_len=16, batch_size=8, progress=False,
                          logits_on_demand_above=255, snapshot_tokens=0)
    assert manifest["settings"]["logits_on_demand_above"] == 255
    table = pq.read_table(tmp_path / "run" / "features.parquet")
    for name in ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values"):
        assert table.column(name).null_count == 256, name
    assert table.column("neighbor_ids").null_count == 0
