"""The Overview's cards: explained variance with and without the massive-activation tokens, the CE loss increase
in nats (± its 95% interval) beside the ratio, and the KL score; runs written before the manifest recorded these
still show what they have (the increase from the two losses, the statistic tokens' explained variance)."""

import json
import shutil

import pytest

from dashboard.render import fmt
from engine.run.store import RunStore

from .test_pages import metric, no_crash

NEW_KEYS = ("ce_loss_increase", "ce_loss_increase_ci95", "kl_div_with_ablation", "kl_score",
            "explained_variance_with_massive", "explained_variance_without_massive", "n_massive_tokens")
EV_ALL, EV_TYPICAL = "Explained variance", "EV without massive tokens"
CE_INCREASE = "CE loss increase (nats)"


@pytest.fixture(scope="module")
def store(tiny_runs):
    with RunStore.open(tiny_runs["topk"]) as s:
        yield s


def test_overview_shows_the_ce_loss_increase_and_interval_beside_the_ratio(tiny_runs, open_app, store):
    at = open_app(tiny_runs["topk"])
    no_crash(at)
    m = store.manifest()["metrics"]
    assert m["ce_loss_increase"] == pytest.approx(m["ce_loss_with_sae"] - m["ce_loss_clean"], abs=1e-9)
    assert m["ce_loss_increase_ci95"] > 0 and m["kl_div_with_ablation"] > m["kl_div"]
    card = next(c for c in at.metric if c.label == CE_INCREASE)
    assert card.value == fmt(m["ce_loss_increase"]) and card.delta == f"± {fmt(m['ce_loss_increase_ci95'])}"
    assert metric(at, "CE loss recovered") == fmt(m["ce_loss_recovered"])
    assert any(f"KL score {fmt(m['kl_score'])}" in c.value for c in at.caption)
    assert metric(at, EV_ALL) == fmt(m["explained_variance_with_massive"])
    assert metric(at, EV_TYPICAL) == fmt(m["explained_variance_without_massive"]) == fmt(m["explained_variance"])


def test_a_run_without_the_new_keys_shows_the_increase_from_its_losses(tiny_runs, open_app, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(tiny_runs["topk"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    for key in NEW_KEYS:
        del manifest["metrics"][key]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with RunStore.open(run) as old:
        got = old.metrics()
    assert all(getattr(got, key) is None for key in NEW_KEYS) and got.ce_loss_clean is not None
    at = open_app(run)
    no_crash(at)
    m = manifest["metrics"]
    card = next(c for c in at.metric if c.label == CE_INCREASE)
    assert card.value == fmt(m["ce_loss_with_sae"] - m["ce_loss_clean"]) and not card.delta
    assert not any("KL score" in c.value for c in at.caption)
    assert metric(at, EV_ALL) == "–" and metric(at, EV_TYPICAL) == fmt(m["explained_variance"])
