"""The app on the real demo run (slow): ``saescope demo`` prepares it (precompute once, ~3 minutes on 2 cores),
then every page works on the real model and the committed SAE."""

import pytest

from engine import cli
from engine.demo import demo_sae_dir
from engine.serve import demo_run_dir
from engine.store import RunStore

pytestmark = pytest.mark.slow

STEER = "views/steering.py"


@pytest.fixture(scope="module")
def demo_run():
    if not (demo_sae_dir() / "cfg.json").is_file():
        pytest.skip(f"no demo SAE in {demo_sae_dir()}")
    assert cli.main(["demo", "--no-serve"]) == 0
    return demo_run_dir()


def test_demo_run_in_every_page(demo_run, open_app):
    with RunStore.open(demo_run) as store:
        man = store.manifest()
        top = store.top_features(sort_by="max_act", limit=1)[0]
        n = store.n_features()
    assert man["model"]["family"] == "llama" and man["sae"]["hook"] == "blocks.15.hook_resid_post"

    at = open_app(demo_run)
    assert not at.exception and not at.error
    assert any(f"**{n:,}** latents" in m.value for m in at.markdown)

    at = open_app(demo_run, "views/features.py", feature=top["feature_id"])
    assert not at.exception and not at.error and at.title[0].value == f"Feature #{top['feature_id']}"
    assert any("saescope-tokens" in h.proto.body for h in at.get("html"))

    at = open_app(demo_run, "views/lens.py")
    at.toggle(key="lens_chat").set_value(True)
    at.text_area(key="lens_text").input("What does <b>bold</b> mean in HTML?").run()
    assert not at.exception and not at.error
    body = at.get("html")[0].proto.body
    assert "im_start" in body and "&lt;" in body and "<b>" not in body and "</b>" not in body
    table = at.dataframe[0].value
    assert (table["L0"][table["counted"]] > 0).all() and table["ΔCE"].notna().any()

    at = open_app(demo_run, STEER, latents=f"{top['feature_id']}:10", prompt="My favourite food is", max_new=16, seed=0)
    assert not at.exception and not at.error
    baseline, steered = [h.proto.body for h in at.get("html") if "saescope-generation" in h.proto.body]
    assert baseline != steered
