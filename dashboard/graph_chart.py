"""The attribution graph figure (a pure function: placed nodes and links in, a plotly figure out). WebGL traces keep
it responsive at about a thousand nodes and several thousand links."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dashboard import render
from engine.graph.layout import Placed

COLOURS = {"feature": "#f76707", "error": "#868e96", "embedding": "#1c7ed6", "logit": "#2f9e44", "supernode": "#ae3ec9"}
PINNED = "#e03131"


def hover(node: Placed) -> str:
    """A node's hover text; every file-controlled piece escaped (plotly renders a subset of HTML)."""
    parts = [f"<b>{render.escape(node.node_id)}</b> · {node.kind}"]
    if node.kind == "supernode":
        parts.append(f"supernode · around layer {node.layer} · position {node.position}")
    elif node.kind == "feature":
        parts.append(f"latent {node.feature} · layer {node.layer} · position {node.position}")
    else:
        parts.append(f"layer {node.layer if node.layer >= 0 else 'E'} · position {node.position}")
    if node.label:
        parts.append(render.escape(render.visible(node.label))[:120])
    if node.influence is not None:
        parts.append(f"cumulative influence {node.influence:.3f}")
    if node.activation is not None:
        parts.append(f"activation {node.activation:.3g}")
    return "<br>".join(parts)


def graph_figure(nodes: Sequence[Placed], links: Sequence[dict[str, Any]], tokens: Sequence[str], *,
                 selected: str | None = None, pinned: frozenset[str] = frozenset(), height: int = 760) -> go.Figure:
    """Nodes layer by layer over the prompt's tokens; links drawn as thin lines (orange adds, blue subtracts); the
    selected node ringed in black, pinned ones in red; supernodes as diamonds."""
    where = {n.node_id: (n.x, n.y) for n in nodes}
    fig = go.Figure()
    for sign, colour in ((1, "rgba(247,103,7,0.35)"), (-1, "rgba(28,126,214,0.35)")):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for link in links:
            if (link["weight"] >= 0) != (sign > 0):
                continue
            a, b = where.get(link["source"]), where.get(link["target"])
            if a is None or b is None:
                continue
            xs += [a[0], b[0], None]
            ys += [a[1], b[1], None]
        fig.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", line=dict(width=1, color=colour), hoverinfo="skip",
                                   name="adds" if sign > 0 else "subtracts"))
    for kind, colour in COLOURS.items():
        members = [n for n in nodes if n.kind == kind]
        if not members:
            continue
        sizes = [18 if kind == "supernode" else 8 + 14 * (1 - (n.influence if n.influence is not None else 1.0))
                 for n in members]
        rings = [3 if n.node_id == selected or n.node_id in pinned else 0 for n in members]
        ring_colours = ["#000" if n.node_id == selected else PINNED for n in members]
        fig.add_trace(go.Scattergl(
            x=[n.x for n in members], y=[n.y for n in members], mode="markers", name=kind,
            marker=dict(size=sizes, color=colour, symbol="diamond" if kind == "supernode" else "circle",
                        line=dict(width=rings, color=ring_colours)),
            customdata=[n.node_id for n in members], hovertext=[hover(n) for n in members], hoverinfo="text"))
    top = max((n.layer for n in nodes), default=0)
    fig.update_layout(
        height=height, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.04), dragmode="pan",
        xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))),
                   ticktext=[render.escape(render.visible(t))[:12] for t in tokens], tickangle=-45),
        yaxis=dict(title="layer", tickmode="array", tickvals=[-1, *range(0, top + 1)],
                   ticktext=["emb", *[str(i) for i in range(0, top)], "logit"]),
    )
    return fig
