"""The Graph page's panels for pinned nodes: the pinned list, supernodes (by hand, suggested, saved) and steering.
Pins live in the URL (``pinned=ID,ID``); supernodes in ``NAME.supernodes.json`` beside the graph (engine.graph.
supernodes); the interventions are engine.graph.interventions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from dashboard import access, common, graph_cache, render
from engine.graph.layout import Placed
from engine.graph.supernodes import Supernode

PINNABLE = ("feature", "supernode")
MULTIPLIERS = (-2.0, 4.0)
"""The steering slider's range: multiples of a node's clean activation (0 ablates, 1 changes nothing)."""
NEW_TOKENS = 12


def url_pins(groups: Sequence[Supernode], valid: set[str]) -> list[str]:
    """The pins in the URL, a member of a saved supernode standing for its supernode, unknown ids dropped."""
    owner = {m: g.id for g in groups for m in g.members}
    text = st.query_params.get("pinned") or st.query_params.get("pinnedIds") or ""  # pinnedIds: Neuronpedia's links
    raw = [p for p in text.split(",") if p]
    return [p for p in dict.fromkeys(owner.get(p, p) for p in raw) if p in valid]


def set_pins(pins: Sequence[str]) -> None:
    st.query_params.pop("pinnedIds", None)
    if pins:
        st.query_params["pinned"] = ",".join(pins)
    else:
        st.query_params.pop("pinned", None)


def pins_changed() -> None:
    set_pins(st.session_state["graph_pins"])


def describe(node: Placed, explain: Callable[[Placed], str]) -> str:
    return explain(node) if node.kind == "feature" else node.label


def pinned_table(pinned: Sequence[Placed], tokens: Sequence[str], influence: dict[str, float],
                 groups: Sequence[Supernode], explain: Callable[[Placed], str]) -> None:
    """One row per pinned node or supernode: what it is, its influence and where it sits."""
    members = {g.id: g.members for g in groups}
    rows = []
    for node in pinned:
        ids = members.get(node.node_id, (node.node_id,))
        rows.append({
            "node": node.node_id, "label / explanation": render.visible(describe(node, explain)),
            "influence": sum(influence.get(i, 0.0) for i in ids) if influence else None,
            "layer": node.layer, "position": node.position,
            "token": render.visible(tokens[node.position]) if 0 <= node.position < len(tokens) else "",
            "members": ", ".join(ids) if node.kind == "supernode" else "",
        })
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption("Influence: the node's share of the targets through every path (a supernode's is its members' sum); "
               "a supernode sits at its members' mean layer and position.")


def save(path, document: dict[str, Any], groups: list[Supernode], pins: list[str] | None = None) -> None:
    from engine.graph.supernodes import save_groups

    with common.shown_errors("Could not save the supernodes"):
        save_groups(path, document, groups)
        if pins is not None:
            set_pins(pins)
        st.rerun()


def supernodes_panel(path, document: dict[str, Any], groups: list[Supernode], pins: list[str],
                     by_id: dict[str, Placed]) -> None:
    """Group the pinned feature nodes; accept a suggestion; rename or remove a saved supernode."""
    from engine.graph.supernodes import add_group, remove_group, rename_group, suggest

    writable = not access.read_only()
    features = [p for p in pins if by_id[p].kind == "feature"]
    st.markdown("**Supernodes** · drawn as one node: links to and from the members summed per other node (links "
                "between members dropped), influence summed")
    if not writable:
        st.caption("The app is read-only: supernodes cannot be saved here.")
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    name = c1.text_input("Name for the pinned feature nodes", value=f"supernode {len(groups) + 1}",
                         key=f"graph_group_name_{len(groups)}")
    if c2.button(f"Group {len(features)} pinned feature nodes", key="graph_group",
                 disabled=not (writable and len(features) >= 2 and name.strip())):
        new = add_group(groups, name, features)
        save(path, document, new, [p for p in pins if p not in features] + [new[-1].id])
    for g in groups:
        c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
        members = ", ".join(g.members[:6]) + (", …" if len(g.members) > 6 else "")
        new_name = c1.text_input(render.md(f"{g.id}: {len(g.members)} nodes ({members})"), value=g.name,
                                 key=f"graph_rename_{g.id}")
        if c2.button("Rename", key=f"graph_rename_btn_{g.id}", disabled=not writable or new_name == g.name):
            save(path, document, rename_group(groups, g.id, new_name))
        if c3.button("Remove", key=f"graph_remove_{g.id}", disabled=not writable):
            save(path, document, remove_group(groups, g.id), [p for p in pins if p != g.id])
    taken = {m for g in groups for m in g.members}
    suggestions = [s for s in suggest(document) if not taken & set(s)]
    with st.expander(f"Suggested supernodes ({len(suggestions)})"):
        st.caption("Feature nodes whose signed edge profiles (weights from each source and to each target) have "
                   "cosine >= 0.75, joined into groups. Accept one to save it under a name.")
        for i, group in enumerate(suggestions[:20]):
            c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
            label = ", ".join(render.code(node_id) for node_id in group)
            c1.markdown(f"**{i + 1}.** {label}")
            accepted = c1.text_input("Name", value=f"suggestion {i + 1}", key=f"graph_suggest_name_{i}",
                                     label_visibility="collapsed")
            if c2.button("Accept", key=f"graph_accept_{i}", disabled=not writable):
                save(path, document, add_group(groups, accepted, group))
        if not suggestions:
            st.caption("No two feature nodes (outside the saved supernodes) are that alike in this graph.")


def steer_panel(run: str, extra: dict[str, Any], pinned: Sequence[Placed], groups: Sequence[Supernode]) -> None:
    """A multiplier per pinned node or supernode; the next token and a continuation, attention free and frozen."""
    st.markdown("**Steer or ablate the pinned nodes**")
    if not (extra.get("transcoders") and extra.get("token_ids")):
        st.caption("This graph file does not record its transcoders and token ids (it was not written by saescope), "
                   "so its nodes cannot be steered here.")
        return
    st.caption("Each pinned node's write is set to a multiple of its clean value at its layer and position (0 "
               "ablates, 1 changes nothing; a supernode's members all get its multiple). The intervention applies at "
               "the prompt's positions only: generated tokens run the real model, reading the changed prompt.")
    multipliers: dict[str, float] = {}
    for node in pinned:
        multipliers[node.node_id] = st.slider(
            render.md(f"{node.node_id} · {node.label[:60] or node.kind}"), *MULTIPLIERS, value=0.0, step=0.25,
            key=f"graph_m_{node.node_id}")
    freeze = st.toggle("Freeze attention (also show the local replacement model: attention patterns and norm scales "
                       "frozen, other nodes held)", value=True, key="graph_freeze")
    if not st.button("Steer", key="graph_steer", disabled=not pinned, type="primary"):
        return
    from engine.graph.interventions import expand, steer, top_tokens
    from engine.model.tokens import display_tokens

    lm, _ = common.live(run)
    with common.shown_errors("Could not steer the nodes"), st.spinner("Generating…"):
        if extra.get("model") and extra["model"] != lm.name:
            raise ValueError(f"the graph was built on {extra['model']}, this run's model is {lm.name}")
        result = steer(lm, graph_cache.transcoders(extra["transcoders"]), [int(t) for t in extra["token_ids"]],
                       expand(multipliers, list(groups)), new_tokens=NEW_TOKENS, freeze_attention=freeze)
        runs = {"original": result.clean, "attention free": result.free}
        if result.frozen is not None:
            runs["attention frozen"] = result.frozen
        shown = list(dict.fromkeys(t for outcome in runs.values() for t, _, _ in top_tokens(outcome.logits)))
        texts = display_tokens(lm.tokenizer, shown)
        rows = []
        for token, text in zip(shown, texts, strict=True):
            row: dict[str, Any] = {"token": render.visible(text)}
            for title, outcome in runs.items():
                row[f"p {title}"] = float(outcome.logits.float().softmax(-1)[token])
                if title != "original":
                    row[f"Δ logit {title}"] = float(outcome.logits[token] - result.clean.logits[token])
            rows.append(row)
        st.dataframe(rows, hide_index=True, width="stretch")
        columns = st.columns(len(runs))
        for column, (title, outcome) in zip(columns, runs.items(), strict=True):
            column.markdown(f"**{render.md(title)}**")
            column.markdown(render.code(lm.tokenizer.decode(outcome.continuation)))
