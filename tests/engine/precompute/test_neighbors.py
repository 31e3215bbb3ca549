"""Decoder neighbours at scale: exact up to ``neighbors_exact_max`` (brute force in numpy), an IVF search beyond it
whose recall@n in the manifest equals a brute-force recount on the run's own neighbour columns."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.precompute.features import decoder_norms, latent_neighbors, latent_neighbors_of
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_latents_neighbours_on_demand_equal_brute_force(dtype):
    sae = random_sae("topk", d_sae=2048).to(dtype)
    exact = _brute(sae, 10)
    norms = decoder_norms(sae)
    for latent in (0, 17, 2047):
        ids, cos = latent_neighbors_of(sae, latent, 10, norms=norms)
        assert np.array_equal(ids, exact[latent]), latent
        w = sae.W_dec.detach().double().numpy()
        want = w[ids] @ w[latent] / np.linalg.norm(w[ids], axis=1) / np.linalg.norm(w[latent])
        np.testing.assert_allclose(cos, want, atol=1e-5)
    assert np.array_equal(latent_neighbors_of(sae, 5, 10)[0], exact[5])  # norms computed when not given
    with pytest.raises(ValueError, match="latent 2048 is out of range: this SAE has 2048 latents"):
        latent_neighbors_of(sae, 2048)


def test_neighbours_on_demand_fall_back_to_float32_when_bf16_cannot_separate_the_candidates():
    """600 near-copies of one direction (cosines within bf16's error of each other) and the rest random: the bf16
    candidates cannot be trusted, so every row is scored in float32; the answer is still brute force's."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, generator=gen)
    near = base + 0.02 * torch.randn(600, 64, generator=gen)
    rows = torch.cat([near, torch.randn(1400, 64, generator=gen)])
    sae = random_sae("topk", d_in=64, d_sae=2000)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    sae = sae.to(torch.bfloat16)
    want = _brute(sae, 10)[0]
    w, norms = sae.W_dec.detach(), decoder_norms(sae)
    in_bf16 = ((w @ (w[0].float() / norms[0]).to(w.dtype)).float() / norms)[1:].topk(10).indices + 1
    assert not np.array_equal(in_bf16.numpy(), want)  # bf16 alone ranks them wrongly
    ids, _ = latent_neighbors_of(sae, 0, 10)
    assert np.array_equal(ids, want)


def test_a_run_wider_than_neighbors_on_demand_above_stores_no_neighbours(tiny_llama, tmp_path):
    sae = random_sae("topk", d_sae=256, hook="blocks.1.hook_resid_post")
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=4)
    manifest = precompute(tiny_llama, sae, corpus, tmp_path / "run", context_len=16, batch_size=8, progress=False,
                          neighbors_on_demand_above=255, snapshot_tokens=0)
    assert manifest["neighbors"] == {"method": "on_demand", "n": 10}
    table = pq.read_table(tmp_path / "run" / "features.parquet")
    assert table.column("neighbor_ids").null_count == table.column("neighbor_cos").null_count == 256
    assert table.column("top_logit_ids").null_count == 0
