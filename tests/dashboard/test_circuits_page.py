"""The Circuits page through AppTest on a tiny circuit run: metrics, heatmaps, ROC, a head's codes, deep links."""

import numpy as np
import pytest

from dashboard.render import md
from tests.engine.circuits.circuit_util import tiny_circuit

from .test_pages import errors, htmls, metric, no_crash, plotly, values

CIRCUITS = "views/circuits.py"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits_page")
    result, _ = tiny_circuit(root)
    return root, result


def test_the_page_shows_the_run_and_a_linked_head(served, open_app):
    root, result = served
    at = open_app(root, CIRCUITS, task="tiny", head="L1.H2")
    no_crash(at)
    assert not errors(at)
    assert metric(at, "Accuracy") == f"{result.performance.accuracy:.0%}"
    heat, roc = plotly(at)[:2]
    # the node panel is the unique-to-positive counts scaled by their largest value
    counts = result.unique_positive.reshape(result.n_layers, result.n_heads)
    shown = values(heat["data"][0]["z"]).reshape(counts.shape)
    np.testing.assert_allclose(shown, counts / max(counts.max(), 1e-12))
    assert any(f"AUC {a.roc.auc:.3f}" in trace["name"] for a in result.agreements for trace in roc["data"])
    assert at.selectbox(key="circuit_head").value == "L1.H2"
    assert at.query_params["head"] == "L1.H2"
    index = 1 * result.n_heads + 2
    page = "".join(htmls(at))
    for code in result.codes[:, index]:
        assert f"#{int(code)}" in page
    assert "Then God" not in page and "And God said, Let there be" in page


def test_no_circuits_says_how_to_make_one(tmp_path, open_app):
    at = open_app(tmp_path, CIRCUITS)
    no_crash(at)
    assert "saescope circuit --model" in at.info[0].value


def test_an_uploaded_task_the_model_fails_is_refused_in_the_page(tiny_runs, open_app):
    import json

    from tests.engine.circuits.circuit_util import ROWS

    run = tiny_runs["topk"]
    at = open_app(run, CIRCUITS)
    bad = [{"prompt": "import numpy as", "answer": " np", "counterfactual": "import numpy as np"}] * 2
    for rows, message in ((bad, "bad.jsonl row 1: the prompt has 5 tokens and its counterfactual 6"),
                          ([{"prompt": p, "answer": a, "counterfactual": c} for p, a, c in ROWS],
                           "the model does not do the bad task")):
        body = "\n".join(json.dumps(r) for r in rows).encode()
        at.file_uploader(key="circuit_upload").set_value(("bad.jsonl", body, "application/json")).run()
        at.button(key="circuit_go").click().run()
        no_crash(at)
        assert md(message) in errors(at)  # the error as the page escapes it for markdown
    assert not (run / "circuits" / "bad").exists()


def test_an_uploaded_task_gets_its_circuit_and_opens(tiny_runs, open_app, tmp_path):
    import json
    import shutil

    from tests.engine.circuits.circuit_util import ROWS

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["topk"], run)
    at = open_app(run, CIRCUITS)
    body = "\n".join(json.dumps({"prompt": p, "answer": a, "counterfactual": c}) for p, a, c in ROWS).encode()
    at.file_uploader(key="circuit_upload").set_value(("mine.jsonl", body, "application/json")).run()
    at.number_input(key="circuit_min_accuracy").set_value(0.0).run()
    at.button(key="circuit_go").click().run()
    no_crash(at)
    assert not errors(at)
    assert (run / "circuits" / "mine" / "metrics.json").is_file()
    assert at.selectbox(key="circuit_task").value == "mine" and at.query_params["task"] == "mine"
    assert metric(at, "Accuracy") == "0%"


def test_the_head_panel_and_the_supervised_panel(tmp_path, tiny_attn_run, open_app):
    import json
    import shutil

    import pyarrow.parquet as pq

    from engine.circuits.head_latents import head_latents, top_latents
    from engine.circuits.supervised_files import write_supervised
    from engine.run.loaded import load_run_model, load_run_sae
    from engine.run.manifest import sections
    from tests.engine.circuits.circuit_util import fake_supervised

    shutil.copytree(tiny_attn_run, tmp_path / "attn")  # a folder of runs: the attention run and the circuits
    result, folder = tiny_circuit(tmp_path)
    man = json.loads((tmp_path / "attn" / "manifest.json").read_text())
    hook = str(sections(man).sae.hook)
    write_supervised(tmp_path / "circuits", fake_supervised(hook), "tiny", "planted")
    at = open_app(tmp_path, CIRCUITS, task="tiny", head="L1.H2")
    no_crash(at)
    assert not errors(at)
    # the head panel: the latents head 2 writes most on the positive prompts, as the engine computes them
    lm, sae = load_run_model(man, "attn", device="cpu"), load_run_sae(man, "attn")
    prompts = pq.read_table(folder / "prompts.parquet").to_pandas()
    sides = [[list(ids) for ids in prompts[prompts["positive"] == flag]["token_ids"].head(12)] for flag in (True, False)]
    best = top_latents(head_latents(lm, sae, sides[0], sides[1], 2))
    assert best[0]  # the head writes some latent: the check below is not vacuous
    tables = [t.value for t in at.dataframe]
    assert any(list(t.columns) == ["latent", "label", "positive", "counterfactual"] and t["latent"].tolist() == best[0]
               for t in tables)
    # the supervised panel: the planted numbers, and the success curve
    summary = next(t for t in tables if "recovered (SAE)" in t.columns)
    assert summary["recovered (SAE)"].tolist() == ["0.667"] and summary["control supervised"].tolist() == ["75%"]
    curve = plotly(at)[-1]
    assert values(curve["data"][0]["y"]).tolist() == [0.0, 0.25, 0.5]
    # a head of a layer with no attention SAE says so
    at = open_app(tmp_path, CIRCUITS, task="tiny", head="L0.H1")
    assert any("No attention-output SAE at layer 0" in c.value for c in at.caption)
