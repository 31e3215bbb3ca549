"""A run that leaves the logit effects out (``logits_on_demand_above``): the feature page computes a latent's with
the run's model and SAE, and shows the tokens of a dense product through the unembedding."""

import html

import numpy as np
import pyarrow.parquet as pq
import torch

from dashboard.render import visible
from engine.model.loading import load_model
from engine.run import loaded
from engine.run.rundir import read_manifest
from engine.run.store import RunStore
from engine.saes import load_sae
from tests.dashboard.tinyrun import build_tiny_run

FEATURES = "views/features.py"


def test_feature_page_computes_logit_effects_the_run_left_out(tmp_path, open_app):
    run = build_tiny_run(tmp_path, "topk", name="lazy", logits_on_demand_above=0)
    table = pq.read_table(run / "features.parquet")
    assert table.column("top_logit_ids").null_count == table.num_rows  # none stored
    man = read_manifest(run)
    assert man is not None
    lm = load_model(loaded.model_source(man), device="cpu", dtype="float32")
    sae = load_sae(loaded.sae_source(man))
    latent = 3
    # independent: the decoder row, scaled by the final norm's weight, through the unembedding
    direction = sae.W_dec[latent].detach().double() * lm.final_norm_scale().double()
    logits = lm.unembed_matrix().detach().double() @ direction
    promoted = torch.topk(logits, 3).indices.tolist()
    suppressed = torch.topk(-logits, 3).indices.tolist()
    at = open_app(run, FEATURES, feature=latent)
    assert not at.exception, [e.value for e in at.exception]
    body = " ".join(h.proto.body for h in at.get("html"))
    assert "Not in this run" not in " ".join(c.value for c in at.caption)
    with RunStore.open(run) as store:
        shown = store.decode([*promoted, *suppressed])
    for token_id, token in zip([*promoted, *suppressed], shown, strict=True):
        assert html.escape(visible(token)) in body, (token_id, token)
    assert np.isfinite(logits.numpy()).all()


def test_feature_page_finds_the_neighbours_the_run_left_out(tmp_path, open_app):
    run = build_tiny_run(tmp_path, "topk", name="lazy-neighbours", neighbors_on_demand_above=0)
    assert pq.read_table(run / "features.parquet").column("neighbor_ids").null_count > 0  # none stored
    man = read_manifest(run)
    assert man is not None and man["neighbors"]["method"] == "on_demand"
    sae = load_sae(loaded.sae_source(man))
    latent = 5
    w = sae.W_dec.detach().double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    sims = w @ w[latent]
    sims[latent] = -np.inf
    nearest = np.argsort(-sims, kind="stable")[:3]  # independent: numpy over the whole decoder
    at = open_app(run, FEATURES, feature=latent)
    assert not at.exception, [e.value for e in at.exception]
    links = [link.proto.label for link in at.get("page_link")]
    for other in nearest:
        assert any(label.startswith(f"#{other}") and f"cos {sims[other]:.2f}" in label for label in links), (other, links)
    assert "Not in this run" not in " ".join(c.value for c in at.caption)
