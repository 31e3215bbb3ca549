"""Plotly figures of the app (pure functions: arrays in, figure out; no caching, no Streamlit)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

ORANGE = "#f76707"
VIOLET = "#7c3aed"
GREY = "#868e96"


def _layout(fig: go.Figure, *, x: str, y: str, height: int = 300) -> go.Figure:
    fig.update_layout(
        height=height, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=x, yaxis_title=y,
        bargap=0.05, showlegend=len(fig.data) > 1, legend=dict(orientation="h", y=1.12),
    )
    return fig


def density_histogram(densities: np.ndarray, bins: int = 60) -> go.Figure:
    """Histogram of latent densities on a log10 axis; dead latents (density 0) counted in the title."""
    densities = np.asarray(densities, dtype=np.float64)
    alive = densities[densities > 0]
    dead = int((densities <= 0).sum())
    fig = go.Figure()
    if alive.size:
        logs = np.log10(alive)
        lo, hi = math.floor(logs.min()), max(math.ceil(logs.max()), math.floor(logs.min()) + 1)
        fig.add_trace(go.Histogram(x=logs, xbins=dict(start=lo, end=hi, size=(hi - lo) / bins), marker_color=ORANGE, name="latents"))
        ticks = list(range(lo, hi + 1))
        fig.update_xaxes(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
        fig.add_vline(x=-1, line_dash="dot", line_color=GREY, annotation_text="dense (10%)", annotation_position="top left")
    fig.update_layout(title=dict(text=f"{alive.size:,} live latents · {dead:,} dead (not shown)", font=dict(size=13)))
    return _layout(fig, x="density (fraction of tokens where the latent fires, log scale)", y="latents")


def activation_histogram(counts: Sequence[int], edges: Sequence[float]) -> go.Figure:
    """A latent's firing activations, binned (``len(edges) == len(counts) + 1``)."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts)
    if counts.size == 0 or edges.size != counts.size + 1:
        return _layout(go.Figure(), x="activation", y="tokens")
    centers, widths = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    fig = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker_color=ORANGE, name="tokens",
                           hovertemplate="activation %{x:.3g}<br>%{y} tokens<extra></extra>"))
    return _layout(fig, x="activation (where the latent fires)", y="tokens", height=260)


def value_histogram(series: dict[str, Sequence[float]], *, x: str, bins: int = 60, log_y: bool = False) -> go.Figure:
    """Overlaid histograms of a few named value series (e.g. error norms: total, linear, nonlinear)."""
    colors = [VIOLET, ORANGE, GREY, "#1c7ed6"]
    fig = go.Figure()
    for (name, values), color in zip(series.items(), colors):
        values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
        if values.size:
            fig.add_trace(go.Histogram(x=values, nbinsx=bins, name=name, marker_color=color, opacity=0.7))
    fig.update_layout(barmode="overlay")
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, x=x, y="tokens")
