"""The Graph page through AppTest on a tiny run with random transcoders: the drawing matches the graph file, hover
text is escaped, deep links select a node, and a graph can be built from the page."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.graph.build import GraphConfig
from engine.graph.files import make_graph
from engine.graph.layout import place
from engine.model.loading import load_model
from tests.engine.graph.graph_util import random_transcoder

GRAPH = "views/graph.py"
PROMPT = "Let there be <b>light</b> & 'x'"


@pytest.fixture(scope="module")
def graph_run(tiny_runs, tmp_path_factory):
    """A copy of the tiny TopK run with random transcoders beside it and one graph in ``graphs/g1.json``."""
    root = tmp_path_factory.mktemp("graph_run")
    run = root / "run"
    shutil.copytree(tiny_runs["topk"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    lm = load_model(manifest["model"]["path"], device="cpu", dtype="float32")
    folder = root / "tc"
    for layer in range(lm.n_layers):
        random_transcoder(layer, lm.d_model).save(folder / f"layer_{layer}")
    make_graph(lm, folder, PROMPT, GraphConfig(), run / "graphs" / "g1.json")
    return run, folder


def _open(open_app, run, **query):
    at = open_app(run, GRAPH, **query)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_draws_every_node_of_the_file(graph_run, open_app):
    run, _ = graph_run
    at = _open(open_app, run, graph="g1")
    document = json.loads((run / "graphs" / "g1.json").read_text())
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    markers = [t for t in figure["data"] if t.get("mode") == "markers"]
    drawn = [node_id for t in markers for node_id in t["customdata"]]
    assert sorted(drawn) == sorted(n["node_id"] for n in document["nodes"])
    assert next(m.value for m in at.metric if m.label == "Nodes") == str(len(document["nodes"]))
    hovers = " ".join(h for t in markers for h in t["hovertext"])
    own_markup = hovers.replace("<b>", "").replace("</b>", "").replace("<br>", "")
    assert "<" not in own_markup and "&lt;" in hovers  # the prompt's tags are shown as text, never rendered


def test_layout_puts_nodes_on_their_layer_and_token():
    document = {"metadata": {"prompt_tokens": ["a", "b"]}, "nodes": [
        {"node_id": "E_5_0", "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "feature": 0},
        {"node_id": "0_3_1", "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder", "feature": 3,
         "influence": 0.2},
        {"node_id": "0_4_1", "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder", "feature": 4,
         "influence": 0.1},
        {"node_id": "0_1_1", "layer": "1", "ctx_idx": 1, "feature_type": "mlp reconstruction error", "feature": -1},
        {"node_id": "3_7_1", "layer": "3", "ctx_idx": 1, "feature_type": "logit", "feature": 7, "token_prob": 0.5}],
        "links": []}
    placed = {p.node_id: p for p in place(document)}
    assert (placed["E_5_0"].x, placed["E_5_0"].y, placed["E_5_0"].label) == (0, -1, "a")
    assert placed["0_1_1"].kind == "error" and placed["3_7_1"].y == 3
    a, b = placed["0_3_1"], placed["0_4_1"]
    assert a.y == b.y == 0 and 0.6 <= a.x < b.x <= 1.4  # a cell's nodes spread around their token, most influential first


def test_deep_link_selects_a_node(graph_run, open_app):
    run, _ = graph_run
    document = json.loads((run / "graphs" / "g1.json").read_text())
    feature = next(n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder")
    at = _open(open_app, run, graph="g1", node=feature["node_id"])
    assert any(s.value == "Selected node" for s in at.subheader)
    captions = " ".join(c.value for c in at.caption)
    # the run is of blocks.0.hook_resid_post, not a transcoder: no feature page to open, and the page says so
    assert "no feature page" in captions and "Strongest inputs" in captions


def test_build_from_the_page(graph_run, open_app):
    run, folder = graph_run
    at = _open(open_app, run, graph="g1")
    at.text_input(key="graph_tc").input(str(folder))
    at.text_input(key="graph_prompt").input("And God said")
    at.run()
    at.button[0].click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    names = sorted(p.stem for p in (run / "graphs").glob("*.json"))
    assert len(names) == 2
    new = next(n for n in names if n != "g1")
    assert at.query_params["graph"] == [new] or at.query_params["graph"] == new
    assert json.loads((run / "graphs" / f"{new}.json").read_text())["metadata"]["prompt"] == "And God said"


def test_supernode_suggestions_are_listed(graph_run, open_app):
    from engine.graph.supernodes import suggest

    run, _ = graph_run
    at = _open(open_app, run, graph="g1")
    groups = suggest(json.loads((run / "graphs" / "g1.json").read_text()))
    shown = " ".join(m.value for m in at.markdown)
    for group in groups[:20]:
        assert all(node_id in shown for node_id in group)
    if not groups:
        assert any("No two feature nodes" in c.value for c in at.caption)


def test_ablate_a_feature_side_by_side(graph_run, open_app):
    """The selected feature's ablation shows the clean, ablated and attention-frozen top tokens, with the engine's
    probabilities."""
    from engine.graph.check import ablation_preview
    from engine.saes.transcoders import load_transcoders

    run, folder = graph_run
    document = json.loads((run / "graphs" / "g1.json").read_text())
    feature = next(n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder")
    at = _open(open_app, run, graph="g1", node=feature["node_id"])
    at.button(key="graph_ablate").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = " ".join(m.value for m in at.markdown)
    assert "clean" in shown and "ablated, attention frozen" in shown
    manifest = json.loads((run / "manifest.json").read_text())
    lm = load_model(manifest["model"]["path"], device="cpu", dtype="float32")
    layer = int(feature["layer"])
    preview = ablation_preview(lm, load_transcoders(folder)[layer], document["saescope"]["token_ids"],
                               feature["ctx_idx"], feature["feature"], feature["activation"])
    for tops in preview.values():
        assert f"{tops[0][1]:.3f}" in shown


@pytest.fixture
def graph_copy(graph_run):
    """``g1`` copied as ``g2`` (with its nodes table), so tests that save supernodes leave ``g1`` alone."""
    run, folder = graph_run
    graphs = run / "graphs"
    for suffix in (".json", ".nodes.parquet", ".edges.parquet"):
        shutil.copy(graphs / f"g1{suffix}", graphs / f"g2{suffix}")
    yield run, folder
    for path in graphs.glob("g2*"):
        path.unlink()


def _features(run, name="g1", n=2):
    document = json.loads((run / "graphs" / f"{name}.json").read_text())
    return document, [x["node_id"] for x in document["nodes"] if x["feature_type"] == "cross layer transcoder"][:n]


def _pinned(at) -> list[str]:
    value = at.query_params.get("pinned", "")
    value = value[0] if isinstance(value, list) else value
    return [p for p in value.split(",") if p]


def test_pins_in_the_url_are_listed_with_their_influence(graph_copy, open_app):
    import pyarrow.parquet as pq

    run, _ = graph_copy
    _, (a, b) = _features(run, "g2")
    at = _open(open_app, run, graph="g2", pinned=f"{a},nonsense,{b}")
    assert at.multiselect(key="graph_pins").value == [a, b] and _pinned(at) == [a, b]  # an unknown id is dropped
    table = at.dataframe[0].value
    influence = dict(zip(*pq.read_table(run / "graphs" / "g2.nodes.parquet", columns=["node_id", "influence"])
                         .to_pydict().values(), strict=True))
    assert list(table["node"]) == [a, b]
    for node_id, value in zip(table["node"], table["influence"], strict=True):
        assert value == pytest.approx(influence[node_id], rel=1e-6)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    feature = next(t for t in figure["data"] if t.get("name") == "feature")
    rings = dict(zip(feature["customdata"], feature["marker"]["line"]["width"], strict=True))
    assert rings[a] == rings[b] == 3 and sum(rings.values()) == 6  # the pinned nodes, and only they, are ringed
    # a Neuronpedia-style link (pinnedIds, token and logit ids among them) pins its feature nodes under pinned=
    at = _open(open_app, run, graph="g2", pinnedIds=f"E_1_0,{b}")
    assert at.multiselect(key="graph_pins").value == [b] and _pinned(at) == [b] and "pinnedIds" not in at.query_params


def test_group_pinned_nodes_then_steer(graph_copy, open_app):
    """Two pinned features grouped into a supernode (saved beside the graph, drawn as one node with summed links),
    then ablated: the page's table shows the engine's probabilities, attention free and frozen."""
    from engine.graph.interventions import Steer, steer
    from engine.graph.supernodes import load_groups
    from engine.saes.transcoders import load_transcoders

    run, folder = graph_copy
    document, (a, b) = _features(run, "g2")
    at = _open(open_app, run, graph="g2", pinned=f"{a},{b}")
    at.text_input(key="graph_group_name_0").input("<i>pair</i>")
    at.run()
    at.button(key="graph_group").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    groups = load_groups(run / "graphs" / "g2.json")
    assert [(g.id, g.name, g.members) for g in groups] == [("S1", "<i>pair</i>", (a, b))]
    assert _pinned(at) == ["S1"]
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = [i for t in figure["data"] if t.get("mode") == "markers" for i in t["customdata"]]
    assert "S1" in drawn and a not in drawn and b not in drawn
    hovers = " ".join(h for t in figure["data"] if t.get("name") == "supernode" for h in t["hovertext"])
    assert "&lt;i&gt;pair" in hovers and "<i>" not in hovers

    at.slider(key="graph_m_S1").set_value(0.0)
    at.run()
    at.button(key="graph_steer").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    manifest = json.loads((run / "manifest.json").read_text())
    lm = load_model(manifest["model"]["path"], device="cpu", dtype="float32")
    result = steer(lm, load_transcoders(folder), document["saescope"]["token_ids"], [Steer(a, 0.0), Steer(b, 0.0)])
    assert result.frozen is not None
    top = int(result.clean.logits.argmax())
    row = table.iloc[0]
    for column, outcome in (("original", result.clean), ("attention free", result.free),
                            ("attention frozen", result.frozen)):
        assert row[f"p {column}"] == pytest.approx(float(outcome.logits.softmax(-1)[top]), rel=1e-4)
    assert row["Δ logit attention frozen"] == pytest.approx(float(result.frozen.logits[top] - result.clean.logits[top]),
                                                            abs=1e-4)
    shown = " ".join(m.value for m in at.markdown)
    assert str(lm.tokenizer.decode(result.free.continuation)).strip()[:10] in shown


def test_accept_rename_and_remove_supernodes(graph_copy, open_app):
    """A suggestion accepted under a name is saved with the suggested members, renamed, then removed (its pin too)."""
    from engine.graph.supernodes import load_groups, suggest

    run, _ = graph_copy
    document, _ = _features(run, "g2")
    suggestions = suggest(document)
    assert suggestions, "the fixture graph should have a supernode suggestion"
    path = run / "graphs" / "g2.json"
    at = _open(open_app, run, graph="g2")
    at.text_input(key="graph_suggest_name_0").input("capitals")
    at.run()
    at.button(key="graph_accept_0").click()
    at.run()
    assert [(g.id, g.name, list(g.members)) for g in load_groups(path)] == [("S1", "capitals", suggestions[0])]
    at.text_input(key="graph_rename_S1").input("cities")
    at.run()
    at.button(key="graph_rename_btn_S1").click()
    at.run()
    assert [g.name for g in load_groups(path)] == ["cities"]
    at = _open(open_app, run, graph="g2", pinned="S1")
    assert _pinned(at) == ["S1"]
    at.button(key="graph_remove_S1").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert load_groups(path) == [] and _pinned(at) == []
