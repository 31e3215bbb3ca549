"""A transcoder run in the app: the Overview says what it reads and writes, the Dark matter page says its error is
the output side's, and the feature and lens pages work on it."""

import json

import pytest

from tests.dashboard.test_pages import DARK, FEATURES, LENS, metric, no_crash
from tests.dashboard.tinyrun import write_corpus
from tests.engine.saes_util import random_transcoder

READS, WRITES = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory):
    from engine.model.loading import load_model
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    root = tmp_path_factory.mktemp("tc_pages")
    save_tiny_model(root / "model")
    lm = load_model(root / "model", device="cpu", dtype="float32")
    sae_dir = random_transcoder(lm.d_model, layer=1).save(root / "tc")
    run = root / "runs" / "tc"
    precompute(lm, load_sae(sae_dir), write_corpus(root / "corpus.jsonl"), run, context_len=32, sae_path=sae_dir,
               progress=False)
    return run


def test_overview_says_what_the_transcoder_reads_and_writes(tc_run, open_app):
    at = open_app(tc_run)
    no_crash(at)
    from dashboard.render import code

    assert f"transcoder: reads {code(READS)}, writes {code(WRITES)}" in " ".join(c.value for c in at.caption)


def test_dark_matter_page_states_the_output_side_error(tc_run, open_app):
    at = open_app(tc_run, DARK)
    no_crash(at)
    assert any("output-side error" in i.value and WRITES in i.value for i in at.info)
    ev = json.loads((tc_run / "manifest.json").read_text())["metrics"]["explained_variance"]
    assert metric(at, "Explained variance of y") == f"{ev:.3g}"


def test_feature_and_lens_pages_run_on_a_transcoder(tc_run, open_app):
    no_crash(open_app(tc_run, FEATURES))
    at = open_app(tc_run, LENS)
    at.text_area(key="lens_text").input("The quick brown fox").run()
    no_crash(at)
    table = at.dataframe[0].value
    assert (table["L0"][1:] == 6).all() and (table["‖error‖"][1:] > 0).all()
