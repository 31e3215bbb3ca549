"""End to end: the Graph page in Chromium on a tiny run of a layer-1 MLP-input SAE (a transcoder's hook): the graph
draws, clicking a layer-1 feature node selects it (``node=`` in the URL) and its link opens the feature page; a
synthetic graph of about a thousand nodes is there for ``draw_times`` (a measurement, not a test)."""

from __future__ import annotations

import json
import time

import pytest

from engine.graph.build import GraphConfig
from engine.graph.files import make_graph
from engine.model.loading import load_model
from tests.dashboard.tinyrun import build_tiny_run
from tests.e2e.test_browser import browser, idle, page, serving, shot  # noqa: F401  (fixtures)
from tests.engine.graph.graph_util import random_transcoder

pytestmark = pytest.mark.slow

NODE_XY = """name => { const gd = document.querySelector('.js-plotly-plot'); const fl = gd._fullLayout;
    const tr = gd._fullData.find(t => t.name === 'feature');
    const i = tr.customdata.findIndex(id => id.startsWith(name));
    const box = gd.getBoundingClientRect();
    return {id: tr.customdata[i], x: box.left + fl._size.l + fl.xaxis.l2p(tr.x[i]),
            y: box.top + fl._size.t + fl.yaxis.l2p(tr.y[i])}; }"""


def big_graph(n_layers: int = 30, n_pos: int = 16, per_cell: int = 2) -> dict:
    """A graph JSON with about a thousand nodes and four thousand links, in circuit-tracer's fields."""
    nodes, links = [], []
    for pos in range(n_pos):
        nodes.append({"node_id": f"E_{pos}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                      "feature_type": "embedding", "influence": 0.5})
        for layer in range(n_layers):
            for j in range(per_cell):
                nodes.append({"node_id": f"{layer}_{j}_{pos}", "feature": j, "layer": str(layer), "ctx_idx": pos,
                              "feature_type": "cross layer transcoder", "influence": 0.5, "activation": 1.0})
    nodes.append({"node_id": f"{n_layers + 1}_7_{n_pos - 1}", "feature": 7, "layer": str(n_layers + 1),
                  "ctx_idx": n_pos - 1, "feature_type": "logit", "token_prob": 0.9, "clerp": 'Output "x"'})
    ids = [n["node_id"] for n in nodes]
    for i in range(4000):
        links.append({"source": ids[(i * 7) % (len(ids) - 1)], "target": ids[-1], "weight": (-1) ** i * 0.1})
    return {"metadata": {"prompt": "big", "prompt_tokens": [f"t{p}" for p in range(n_pos)]}, "nodes": nodes,
            "links": links}


@pytest.fixture(scope="module")
def graph_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_e2e")
    run = build_tiny_run(root, "topk", hook="blocks.1.ln2.hook_normalized", name="tc")
    lm = load_model(root / "model", device="cpu", dtype="float32")
    folder = root / "tc_set"
    for layer in range(lm.n_layers):
        random_transcoder(layer, lm.d_model, d_sae=256).save(folder / f"layer_{layer}")
    make_graph(lm, folder, "In the beginning was the word", GraphConfig(node_threshold=1.0), run / "graphs" / "g1.json")
    (run / "graphs" / "big.json").write_text(json.dumps(big_graph()))
    with serving(run, tmp_path_factory.mktemp("log")) as base:
        yield base


def test_graph_page_click_opens_the_feature(graph_server, page):  # noqa: F811  (page is a fixture)
    page.goto(f"{graph_server}/graph?graph=g1")
    page.locator(".js-plotly-plot").first.wait_for()
    idle(page)
    node = page.evaluate(NODE_XY, "1_")
    assert node["id"].startswith("1_")
    page.mouse.click(node["x"], node["y"])
    page.get_by_role("heading", name="Selected node").wait_for()
    assert f"node={node['id']}" in page.url
    shot(page, "graph")
    latent = node["id"].split("_")[1]
    page.get_by_role("link", name=f"#{latent}").first.click()
    page.get_by_role("heading", name=f"Feature #{latent}").wait_for()


def draw_times(base: str, tab, names: tuple[str, ...] = ("g1", "big", "g1", "big")) -> list[tuple[str, float]]:
    """Seconds from navigation to a drawn graph, per visit (a measurement for docs/graphs.md, not a test)."""
    times = []
    for name in names:
        start = time.perf_counter()
        tab.goto(f"{base}/graph?graph={name}")
        tab.locator(".js-plotly-plot").first.wait_for()
        idle(tab)
        times.append((name, round(time.perf_counter() - start, 1)))
    return times
