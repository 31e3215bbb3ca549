"""``saescope graph``: the files it writes (Neuronpedia's JSON fields, Parquet tables) and its one-line refusals."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from engine.cli import main
from engine.model.tiny import save_tiny_model
from engine.saes.transcoders import write_circuit_tracer

from .graph_util import PROMPT, random_transcoder

NODE_FIELDS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
               "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    model = save_tiny_model(root / "model")
    sets = {}
    for name, layers, d in (("all", [0, 1], 64), ("one", [1], 64), ("wide", [0, 1], 48)):
        folder = root / name
        for layer in layers:
            tc = random_transcoder(layer, d)
            if name == "one":
                write_circuit_tracer(tc, folder)
            else:
                tc.save(folder / f"layer_{layer}")
        sets[name] = folder
    return model, sets


def _run(files, out, *extra):
    model, sets = files
    return main(["graph", "--model", str(model), "--dtype", "float32", "--transcoders", str(sets["all"]),
                 "--prompt", PROMPT, "--out", str(out), *extra])


def test_writes_neuronpedia_json_and_parquet(files, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert _run(files, out) == 0
    summary = json.loads(capsys.readouterr().out)
    doc = json.loads(out.read_text())
    assert set(doc) >= {"metadata", "qParams", "nodes", "links"}
    assert doc["metadata"]["prompt"] == PROMPT and doc["metadata"]["slug"] == "g"
    n_tokens = len(doc["metadata"]["prompt_tokens"])
    assert n_tokens == summary["tokens"]
    for node in doc["nodes"]:
        assert set(node) == NODE_FIELDS
    kinds = [n["feature_type"] for n in doc["nodes"]]
    assert kinds.count("embedding") == n_tokens and kinds.count("logit") == len(summary["targets"])
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    ids = {n["node_id"] for n in doc["nodes"]}
    assert doc["links"] and all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    nodes = pq.read_table(tmp_path / "g.nodes.parquet").to_pylist()
    assert {n["node_id"] for n in nodes if n["kept"]} == ids
    assert len(nodes) == summary["feature_nodes"] + 3 * n_tokens + len(summary["targets"])  # 2 layers of errors
    edges = pq.read_table(tmp_path / "g.edges.parquet")
    assert edges.num_rows == len(doc["links"]) == summary["kept_edges"]
    assert 0 <= doc["saescope"]["replacement_score"] <= 1 and 0 <= doc["saescope"]["completeness_score"] <= 1


def test_custom_targets(files, tmp_path, capsys):
    assert _run(files, tmp_path / "a.json", "--target", "The") == 0
    assert json.loads(capsys.readouterr().out)["targets"] == ["The"]
    assert _run(files, tmp_path / "b.json", "--target-diff", "The, the") == 0
    assert json.loads(capsys.readouterr().out)["targets"] == ["The -  the"]


def test_missing_layer_is_said(files, tmp_path, capsys):
    model, sets = files
    out = tmp_path / "m.json"
    assert main(["graph", "--model", str(model), "--dtype", "float32", "--transcoders", str(sets["one"]),
                 "--prompt", PROMPT, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing_layers"] == [0] and "layer(s) 0" in summary["note"]
    assert json.loads(out.read_text())["saescope"]["missing_layers"] == [0]


@pytest.mark.parametrize("extra, message", [
    (("--max-tokens", "3"), "over the cap of 3"),
    (("--target", "quick brown"), "is not one token"),
    (("--target-diff", "The"), "two tokens"),
    (("--transcoders-set", "wide"), "is 64 wide in this model"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    model, sets = files
    out = tmp_path / "x" / "bad.json"
    extra = list(extra)
    chosen = sets["all"]
    if extra[0] == "--transcoders-set":
        chosen, extra = sets[extra[1]], []
    code = main(["graph", "--model", str(model), "--dtype", "float32", "--transcoders", str(chosen),
                 "--prompt", PROMPT, "--out", str(out), *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saescope graph:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not out.parent.exists()


def test_unsupported_family_is_refused(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "neox", "gpt_neox")
    folder = tmp_path / "tc"
    random_transcoder(0, 64).save(folder / "layer_0")
    code = main(["graph", "--model", str(model), "--dtype", "float32", "--transcoders", str(folder),
                 "--prompt", PROMPT, "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and "not implemented for the gpt_neox family" in err
    assert not (tmp_path / "o.json").exists()
