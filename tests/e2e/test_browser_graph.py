"""End to end: the Graph page in Chromium on a tiny run of a layer-1 MLP-input SAE (a transcoder's hook): the graph
draws, clicking feature nodes selects and pins them (``node=``, ``pinned=`` in the URL), two pinned nodes become a
supernode that is ablated (next token and continuation, attention free and frozen), a layer-1 node's link opens the
feature page; a synthetic graph of about a thousand nodes is there for ``draw_times`` (a measurement, not a test)."""

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

NODE_XY = """([name, other]) => { const gd = document.querySelector('.js-plotly-plot'); const fl = gd._fullLayout;
    const tr = gd._fullData.find(t => t.name === 'feature');
    const i = tr.customdata.findIndex(id => id.startsWith(name) && id !== other);
    if (i < 0) return null;
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


def _click_node(tab, prefix: str, other: str = "") -> str:
    """Click the first feature node whose id starts with ``prefix`` (and is not ``other``); its id."""
    tab.locator(".js-plotly-plot").first.wait_for()
    idle(tab)
    node = tab.evaluate(NODE_XY, [prefix, other]) or tab.evaluate(NODE_XY, ["", other])
    tab.mouse.click(node["x"], node["y"])
    tab.wait_for_url(lambda url: f"node={node['id']}" in url)
    idle(tab)
    return node["id"]


def test_graph_page_pin_group_steer_and_open_the_feature(graph_server, page):  # noqa: F811  (page is a fixture)
    """Click two feature nodes (each click selects and pins), group them into a supernode, ablate it and see the
    next-token table and the continuations with attention free and frozen; then the selected node's link opens its
    feature page."""
    page.goto(f"{graph_server}/graph?graph=g1")
    first = _click_node(page, "0_")
    node = _click_node(page, "1_", first)
    assert node.startswith("1_") or first.startswith("1_")
    page.get_by_role("heading", name="Selected node").wait_for()
    assert f"pinned={first}%2C{node}" in page.url or f"pinned={first},{node}" in page.url
    assert page.get_by_label("Name for the pinned feature nodes").input_value() == "supernode 1"  # the default name
    page.get_by_role("button", name="Group 2 pinned feature nodes").click()
    page.wait_for_url(lambda url: "pinned=S1" in url)
    idle(page)
    page.get_by_role("button", name="Steer", exact=True).click()
    page.get_by_text("attention frozen", exact=True).wait_for()
    idle(page)
    assert page.get_by_text("attention free", exact=True).is_visible()
    assert page.locator('[data-testid="stDataFrame"]').count() == 2  # the pinned list and the next-token table
    shot(page, "graph")
    selected = node if node.startswith("1_") else first
    if f"node={selected}" not in page.url:
        selected = _click_node(page, "1_")
    latent = selected.split("_")[1]
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
