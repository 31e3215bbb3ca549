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
        # plotly ships no type hints: pyright infers ``data`` as ``Unknown | Figure`` (it is a tuple of traces)
        bargap=0.05, showlegend=len(fig.data) > 1, legend=dict(orientation="h", y=1.12),  # pyright: ignore[reportArgumentType]
    )
    return fig


def density_histogram(densities: np.ndarray, bins: int = 60, cap: float | None = None) -> go.Figure:
    """Histogram of latent densities on a log10 axis; dead latents (density 0) counted in the title; ``cap`` (a
    feature-choice SAE's per-latent cap) marked."""
    densities = np.asarray(densities, dtype=np.float64)
    alive = densities[densities > 0]
    dead = int((densities <= 0).sum())
    fig = go.Figure()
    if alive.size:
        logs = np.log10(alive)
        lo, hi = math.floor(logs.min()), max(math.ceil(logs.max()), math.floor(logs.min()) + 1)
        bins_spec = dict(start=lo, end=hi, size=(hi - lo) / bins)
        fig.add_trace(go.Histogram(x=logs, xbins=bins_spec, marker_color=ORANGE, name="latents"))
        ticks = list(range(lo, hi + 1))
        fig.update_xaxes(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
        fig.add_vline(x=-1, line_dash="dot", line_color=GREY, annotation_text="dense (10%)", annotation_position="top left")
        if cap:
            fig.add_vline(x=math.log10(cap), line_dash="dot", line_color=VIOLET, annotation_text="cap m/N",
                          annotation_position="top right")
    fig.update_layout(title=dict(text=f"{alive.size:,} live latents · {dead:,} dead (not shown)", font=dict(size=13)))
    return _layout(fig, x="density (fraction of tokens where the latent fires, log scale)", y="latents")


def activation_histogram(counts: Sequence[int], edges: Sequence[float]) -> go.Figure:
    """A latent's firing activations, binned (``len(edges) == len(counts) + 1``)."""
    edge = np.asarray(edges, dtype=np.float64)
    count = np.asarray(counts)
    if count.size == 0 or edge.size != count.size + 1:
        return _layout(go.Figure(), x="activation", y="tokens")
    centers, widths = (edge[1:] + edge[:-1]) / 2, np.diff(edge)
    fig = go.Figure(go.Bar(x=centers, y=count, width=widths, marker_color=ORANGE, name="tokens",
                           hovertemplate="activation %{x:.3g}<br>%{y} tokens<extra></extra>"))
    return _layout(fig, x="activation (where the latent fires)", y="tokens", height=260)


def value_histogram(
    series: dict[str, Sequence[float | None]], *, x: str, bins: int = 60, log_y: bool = False, y: str = "tokens"
) -> go.Figure:
    """Overlaid histograms of up to four named value series (e.g. error norms: total, linear, nonlinear); None and
    NaN values are left out."""
    colors = [VIOLET, ORANGE, GREY, "#1c7ed6"]
    fig = go.Figure()
    for (name, values), color in zip(series.items(), colors, strict=False):  # one colour per series, four at most
        finite = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
        if finite.size:
            fig.add_trace(go.Histogram(x=finite, nbinsx=bins, name=name, marker_color=color, opacity=0.7))
    fig.update_layout(barmode="overlay")
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, x=x, y=y)


def head_shares(names: Sequence[str], norm: Sequence[float] | None, energy: Sequence[float] | None,
                data: Sequence[float] | None) -> go.Figure:
    """Per-head shares of one latent side by side: of the decoder row's block norms (Kissane et al.), of its squared
    norm, and of its top examples' pre-activations (any may be None)."""
    fig = go.Figure()
    for values, label, color, what in ((norm, "decoder norm", GREY, "of Σ‖W_dec block‖"),
                                       (energy, "decoder norm²", VIOLET, "of ‖W_dec‖²"),
                                       (data, "top examples", ORANGE, "of pre − bias")):
        if values is not None:
            fig.add_trace(go.Bar(x=list(names), y=list(values), name=label, marker_color=color,
                                 hovertemplate=f"%{{x}}: %{{y:.1%}} {what}<extra>{label}</extra>"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%")
    return _layout(fig, x="head", y="share", height=260)


def width_curves(widths: Sequence[int], series: dict[str, Sequence[float | None]], *, y: str) -> go.Figure:
    """Metrics of SAEs of several widths on one hook: one line per named series over the width (log axis)."""
    colors = [ORANGE, VIOLET, GREY, "#1c7ed6", "#2f9e44"]
    fig = go.Figure()
    order = np.argsort(np.asarray(widths))
    xs = [int(widths[i]) for i in order]
    for (name, values), color in zip(series.items(), colors, strict=False):
        ys = [values[i] for i in order]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, marker_color=color, line_color=color,
                                 hovertemplate="%{x:,} latents: %{y:.4g}<extra>" + name + "</extra>"))
    fig.update_xaxes(type="log", tickvals=xs, ticktext=[f"{x:,}" for x in xs])
    return _layout(fig, x="latents (d_sae)", y=y)


def l0_histogram(l0: np.ndarray) -> go.Figure:
    """Histogram of latents active per token (variable-sparsity SAEs), one bar per count; the mean marked."""
    l0 = np.asarray(l0, dtype=np.int64)
    fig = go.Figure()
    if l0.size:
        fig.add_trace(go.Histogram(x=l0, xbins=dict(start=-0.5, end=int(l0.max()) + 0.5, size=1), marker_color=VIOLET,
                                   name="tokens"))
        mean = float(l0.mean())
        fig.add_vline(x=mean, line_dash="dot", line_color=GREY, annotation_text=f"mean {mean:.1f}",
                      annotation_position="top right")
    return _layout(fig, x="latents active on the token (L0)", y="tokens")


def l0_distributions(hists: dict[str, tuple[Sequence[float], Sequence[int]]]) -> go.Figure:
    """Per-token L0 distributions of several SAEs (the family table's histograms: name -> (edges, counts)), each
    normalised to a fraction of its tokens, as lines over the bin centres."""
    colors = [ORANGE, VIOLET, GREY, "#1c7ed6", "#2f9e44", "#e03131"]
    fig = go.Figure()
    for (name, (edges, counts)), color in zip(hists.items(), colors * 4, strict=False):
        e, c = np.asarray(edges, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        if not c.size or c.sum() == 0:
            continue
        fig.add_trace(go.Scatter(x=(e[:-1] + e[1:]) / 2, y=c / c.sum(), mode="lines", name=name, line_color=color,
                                 hovertemplate="L0 ≈ %{x:.0f}: %{y:.1%} of tokens<extra>" + name + "</extra>"))
    return _layout(fig, x="latents active on the token (L0, binned)", y="fraction of tokens")


def prefix_curve(widths: Sequence[int], explained: Sequence[float], recovered: Sequence[float | None]) -> go.Figure:
    """Explained variance and CE loss recovered of each nested Matryoshka prefix, against its width."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(widths), y=list(explained), mode="lines+markers", name="explained variance",
                             line_color=ORANGE))
    if any(r is not None for r in recovered):
        fig.add_trace(go.Scatter(x=list(widths), y=[r if r is not None else float("nan") for r in recovered],
                                 mode="lines+markers", name="CE loss recovered", line_color=VIOLET))
    fig.update_xaxes(type="log", tickvals=list(widths), ticktext=[f"{w:,}" for w in widths])
    return _layout(fig, x="prefix width (latents 0 .. w-1; log scale)", y="score")


def head_heatmaps(panels: dict[str, np.ndarray], labels: np.ndarray) -> go.Figure:
    """Layers x heads heatmaps side by side, each divided by its largest absolute value so they share one -1..1
    scale; hovering a head shows it in every panel (``labels [layers, heads]`` as ``L3.H1``)."""
    from plotly.subplots import make_subplots

    names = list(panels)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True, horizontal_spacing=0.04)
    for col, name in enumerate(names, 1):
        raw = np.asarray(panels[name], dtype=np.float64)
        scale = float(np.nanmax(np.abs(raw))) or 1.0
        fig.add_trace(go.Heatmap(z=raw / scale, customdata=np.dstack([raw, labels]), zmin=-1, zmax=1,
                                 colorscale="RdBu_r", showscale=col == len(names), name=name,
                                 hovertemplate="%{customdata[1]}: %{customdata[0]:.4g}<extra>" + name + "</extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=col)
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(height=max(300, 18 * labels.shape[0] + 80), margin=dict(l=10, r=10, t=30, b=10),
                      hovermode="closest", hoversubplots="axis")
    return fig


def roc_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> go.Figure:
    """ROC curves ``(name, fpr, tpr)`` with the chance diagonal."""
    colors = [ORANGE, VIOLET, GREY, "#1c7ed6"]
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color=GREY), name="chance",
                               hoverinfo="skip"))
    for (name, fpr, tpr), color in zip(curves, colors, strict=False):
        fig.add_trace(go.Scatter(x=list(fpr), y=list(tpr), mode="lines+markers", name=name,
                                 marker_color=color, line_color=color,
                                 hovertemplate="FPR %{x:.2f}, TPR %{y:.2f}<extra>" + name + "</extra>"))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, x="false positive rate", y="true positive rate", height=340)


def control_curves(curves: Sequence[tuple[str, Sequence[int], Sequence[float]]],
                   levels: Sequence[tuple[str, float]]) -> go.Figure:
    """Edit success against latents exchanged: ``curves`` ``(name, k, success)`` as lines, ``levels`` ``(name,
    success)`` (edits with no k: the supervised edit, no edit) as dotted horizontal lines."""
    colors = [ORANGE, "#1c7ed6", VIOLET, GREY]
    fig = go.Figure()
    top = max([max(k) for _, k, _ in curves if len(k)] or [1])
    for (name, ks, success), color in zip(curves, colors, strict=False):
        fig.add_trace(go.Scatter(x=list(ks), y=list(success), mode="lines+markers", name=name, marker_color=color,
                                 line_color=color, hovertemplate="k %{x}: %{y:.0%}<extra>" + name + "</extra>"))
    for (name, value), color in zip(levels, [VIOLET, GREY], strict=False):
        fig.add_trace(go.Scatter(x=[0, top], y=[value, value], mode="lines", name=name,
                                 line=dict(dash="dot", color=color), hovertemplate=f"{value:.0%}<extra>{name}</extra>"))
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, x="latents exchanged each way (k)", y="edit success", height=300)
