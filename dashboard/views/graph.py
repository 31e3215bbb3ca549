"""Graph: an attribution graph of one prompt over transcoders (``saescope graph``), drawn layer by layer over the
prompt's tokens. Saved graphs are the run's ``graphs/*.json``; ``?graph=NAME&node=NODE_ID&pinned=ID,ID`` links to one, a node and
the pinned nodes. Pinned nodes can be grouped into supernodes and steered (dashboard/graph_view.py)."""

import re

import streamlit as st

from dashboard import access, cache, common, graph_cache, graph_view, render
from dashboard.graph_chart import graph_figure
from engine.run.manifest import sections

run = common.current_run()
man = common.manifest(run)
st.title("Attribution graph")
st.caption("Which transcoder features, at which layers and positions, caused the next-token prediction, through "
           "which direct paths (circuit-tracer's local replacement model; see docs/graphs.md). Hover a node for its "
           "details; click it to select it.")

names = graph_cache.graph_files(run)
with st.expander("New graph from a prompt", expanded=not names):
    if access.read_only():
        st.caption("The app is read-only: build graphs with `saescope graph --out RUN/graphs/NAME.json`.")
    else:
        folder = st.text_input("Transcoders folder", key="graph_tc", help="per-layer transcoders (SAELens folders or "
                               "circuit-tracer layer_<L>.safetensors) for the run's model")
        prompt = st.text_input("Prompt", key="graph_prompt", placeholder="The capital of France is")
        target = st.text_input("Target token (optional)", key="graph_target", help="default: the top logits")
        if st.button("Build the graph", disabled=not (folder and prompt)):
            from engine.graph.build import GraphConfig
            from engine.graph.files import make_graph, slug_of

            lm, _ = common.live(run)
            name = slug_of(prompt + "\x00" + target)
            with st.spinner("Attributing (about 30 s for the demo model on 2 CPU cores)…"), \
                    common.shown_errors("Could not build the graph"):
                make_graph(lm, folder, prompt, GraphConfig(target=target), f"{run}/{graph_cache.GRAPHS}/{name}.json")
                st.query_params["graph"] = name
                st.query_params.pop("node", None)
                st.rerun()

names = graph_cache.graph_files(run)
if not names:
    st.info("No graph yet: build one above, or with `saescope graph ... --out RUN/graphs/NAME.json`.")
    st.stop()
wanted = st.query_params.get("graph")
if wanted is not None and wanted not in names:
    st.warning(f"No graph called {render.code(wanted)} in this run; showing the newest.")


def picked() -> None:
    st.query_params["graph"] = st.session_state["graph_pick"]
    st.query_params.pop("node", None)


# the URL leads (a deep link, a graph just built); the picker follows it
if wanted in names:
    st.session_state["graph_pick"] = wanted
elif st.session_state.get("graph_pick") not in names:
    st.session_state["graph_pick"] = names[0]
name = st.selectbox("Graph", names, key="graph_pick", on_change=picked)
st.query_params["graph"] = name

try:
    document, placed = graph_cache.graph(run, name)
    groups, influence = graph_cache.graph_extras(run, name)
    shown_document, shown = graph_cache.collapsed_graph(run, name)
except Exception as err:
    common.fail(f"Could not read the graph {render.code(name)}: {render.md(err)}")
meta, extra = document.get("metadata", {}), document.get("saescope", {})
tokens = [str(t) for t in meta.get("prompt_tokens", [])]
st.markdown(f"**Prompt:** {render.md(meta.get('prompt', ''))}")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Nodes", len(placed))
c2.metric("Links", len(document["links"]))
if "replacement_score" in extra:
    c3.metric("Replacement score", render.fmt(extra["replacement_score"]))
    c4.metric("Completeness score", render.fmt(extra["completeness_score"]))
if extra.get("missing_layers"):
    st.warning("No transcoder for layer(s) " + ", ".join(str(int(x)) for x in extra["missing_layers"])
               + ": each of their MLPs is one error node per position.")

by_id = {n.node_id: n for n in placed} | {n.node_id: n for n in shown}
pinnable = [n.node_id for n in shown if n.kind in graph_view.PINNABLE]
pins = graph_view.url_pins(groups, set(pinnable))
graph_view.set_pins(pins)
selected = st.query_params.get("node")
clicks = st.session_state.setdefault("graph_clicks", 0)
# a fresh chart key after each click: its selection starts empty, so clicking the same node again toggles its pin
event = st.plotly_chart(graph_figure(shown, shown_document["links"], tokens, selected=selected, pinned=frozenset(pins)),
                        key=f"graph_fig_{name}_{clicks}", on_select="rerun", selection_mode="points",
                        config={"scrollZoom": True})
points = event.selection.points if event and event.selection else []
if points:
    clicked = points[0].get("customdata")
    if isinstance(clicked, str) and clicked in by_id:
        st.session_state["graph_clicks"] = clicks + 1
        st.query_params["node"] = clicked
        if clicked in pinnable:
            graph_view.set_pins([p for p in pins if p != clicked] if clicked in pins else [*pins, clicked])
        st.rerun()

hook = sections(man).sae.hook or ""
match = re.match(r"^blocks\.(\d+)\.ln2\.hook_normalized$", hook)
page_layer = int(match.group(1)) if match else None


def explain(node) -> str:
    """A feature node's explanation where this run is of its layer's transcoder, else its label in the file."""
    if node.layer == page_layer:
        return cache.describe(run, [node.feature]).get(node.feature, "") or node.label
    return node.label


st.subheader("Pinned nodes")
st.caption("Click a feature node or supernode in the graph to pin or unpin it (or pick them here); pins are kept in "
           "the URL.")
st.session_state["graph_pins"] = pins
st.multiselect("Pinned nodes", pinnable, key="graph_pins", on_change=graph_view.pins_changed,
               format_func=lambda i: f"{i} · {render.visible(by_id[i].label)[:50]}" if by_id[i].label else i)
pinned_nodes = [by_id[p] for p in pins]
if pinned_nodes:
    graph_view.pinned_table(pinned_nodes, tokens, influence, groups, explain)
graph_view.supernodes_panel(graph_cache.graph_path(run, name), document, groups, pins, by_id)
graph_view.steer_panel(run, extra, pinned_nodes, groups)

node = by_id.get(selected) if selected else None
if selected and node is None:
    st.caption(f"No node {render.code(selected)} in this graph.")
if node is not None:
    st.subheader("Selected node")
    st.markdown(f"{render.code(node.node_id)} · {node.kind} · layer {node.layer if node.layer >= 0 else 'E'} · "
                f"position {node.position}" + (f" ({render.md(render.visible(tokens[node.position]))})"
                                                if node.position < len(tokens) else ""))
    if node.influence is not None:
        st.caption(f"Cumulative influence {node.influence:.3f}"
                   + (f" · activation {node.activation:.3g}" if node.activation is not None else ""))
    if node.kind == "supernode":
        st.caption(f"{render.md(node.label)}: " + ", ".join(render.code(m) for m in
                                                            next(g.members for g in groups if g.id == node.node_id)))
    if node.kind == "feature":
        if node.layer == page_layer:
            common.feature_link(node.feature, cache.describe(run, [node.feature]).get(node.feature, ""),
                                suffix=" — its feature page in this run")
        else:
            st.caption(f"Latent {node.feature} of layer {node.layer}'s transcoder: this run is of "
                       f"{render.code(hook or 'another SAE')}, so there is no feature page for it here (precompute "
                       "a run on that transcoder to get one).")
    if node.kind == "feature" and extra.get("transcoders") and extra.get("token_ids"):
        if st.button("Ablate this feature: next token with and without frozen attention", key="graph_ablate"):
            from engine.graph.check import ablation_preview
            from engine.model.tokens import display_tokens

            lm, _ = common.live(run)
            with common.shown_errors("Could not ablate the feature"):
                if extra.get("model") and extra["model"] != lm.name:
                    raise ValueError(f"the graph was built on {extra['model']}, this run's model is {lm.name}")
                transcoder = graph_cache.transcoders(extra["transcoders"])[node.layer]
                preview = ablation_preview(lm, transcoder, [int(t) for t in extra["token_ids"]], node.position,
                                           node.feature, float(node.activation or 0.0))
                columns = st.columns(len(preview))
                for column, (title, tops) in zip(columns, preview.items(), strict=True):
                    column.markdown(f"**{render.md(title)}**")
                    texts = display_tokens(lm.tokenizer, [t for t, _ in tops])
                    column.markdown("  \n".join(f"{render.code(text)} {p:.3f}" for text, (_, p) in zip(texts, tops,
                                                                                                       strict=True)))
    drawn = shown_document if node.kind == "supernode" else document
    links = [link for link in drawn["links"] if node.node_id in (link["source"], link["target"])]
    incoming = sorted((link for link in links if link["target"] == node.node_id), key=lambda x: -abs(x["weight"]))
    outgoing = sorted((link for link in links if link["source"] == node.node_id), key=lambda x: -abs(x["weight"]))
    a, b = st.columns(2)
    a.caption("Strongest inputs: " + (", ".join(f"{render.md(x['source'])} ({x['weight']:+.3g})" for x in incoming[:8])
                                     or "none kept"))
    b.caption("Strongest outputs: " + (", ".join(f"{render.md(x['target'])} ({x['weight']:+.3g})" for x in outgoing[:8])
                                      or "none kept"))
