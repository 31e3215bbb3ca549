"""One latent's page: stats, activation histogram, logit effects, neighbours, top and quantile examples."""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING

import streamlit as st

from dashboard import cache, charts, common, explain_view, heads_view, render
from dashboard.render import fmt
from engine.run.rows import Example

if TYPE_CHECKING:
    from engine.run.store import RunStore

EXAMPLES_SHOWN = 12
PER_BIN = 3


def example_html(example: Example, scale: float) -> str:
    """An example window with each token tinted by the latent's activation (exact value on hover)."""
    tokens, acts = example.tokens, example.acts
    titles = [f"{t!r}: {a:.3f}" for t, a in zip(tokens, acts, strict=True)]
    mark = example.max_pos - example.start
    return render.tokens_html(tokens, acts, scale=scale, titles=titles, mark=mark, breaks=False)


def show(run: str, store: RunStore, feature_id: int) -> None:
    row = cache.feature(run, feature_id)
    if st.button("All features", icon=":material/arrow_back:"):
        del st.query_params["feature"]
        st.rerun()
    if row is None:
        n = store.n_features()
        common.fail(f"Feature {feature_id} does not exist: this SAE has {n:,} latents (ids 0 to {n - 1:,}).")

    st.title(f"Feature #{feature_id}")
    widths = (store.manifest().get("sae") or {}).get("matryoshka_widths") or []
    for g, (start, stop) in enumerate(zip([0, *widths[:-1]], widths, strict=True) if widths else []):
        if start <= feature_id < stop:
            st.caption(f"Matryoshka group {g + 1} of {len(widths)} (latents {start:,}–{stop - 1:,}): part of every "
                       f"prefix from {stop:,} latents on.")
    explain_view.show(run, store, row)
    density = float(row.density)
    cols = st.columns([2, 2, 2, 2, 3])
    cols[0].metric("Density", f"{density * 100:.3g}%" if density >= 1e-4 else fmt(density),
                   help=f"fires on {row.fire_count:,} tokens" + (f" (1 in {1 / density:,.0f})" if density else ""))
    exact = {name: "–" if value is None else f"{value:.6g}" for name, value in (("max", row.max_act), ("mean", row.mean_act))}
    cols[1].metric("Max activation", render.compact(row.max_act), help=exact["max"])
    cols[2].metric("Mean activation", render.compact(row.mean_act), help=f"{exact['mean']} over the tokens where it fires")
    cols[3].metric("Fires on", render.compact(row.fire_count), help=f"{row.fire_count:,} tokens")
    if row.gradient_only_count is not None and row.fire_count:  # a g-SAE run
        cols[3].metric("Admitted by gradient alone", f"{row.gradient_only_count / row.fire_count:.1%}",
                       help=f"{row.gradient_only_count:,} of its {row.fire_count:,} firings: at those tokens it fires "
                       "under the g-SAE rule (TopK over z + beta * z * |W_dec grad|) but would not under plain TopK "
                       "over z")
    with cols[4]:
        if row.dead:
            st.warning("Dead: never fired in this run.")
        elif density > 0.1:
            st.info("Dense: fires on more than 10% of tokens.")
        if st.button("Steer with this latent", type="primary", icon=":material/tune:"):
            st.switch_page(common.STEERING_PAGE, query_params={"add": str(feature_id)})

    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Activation histogram**")
        st.plotly_chart(charts.activation_histogram(row.hist_counts or [], row.hist_edges or []), key="act_hist")
    with right:
        st.markdown("**Logit effects** (decoder direction through the unembedding)")
        effects = (row.top_logit_ids, row.top_logit_values, row.bottom_logit_ids, row.bottom_logit_values)
        if row.top_logit_ids is None:  # a wide run leaves them to this page (logits_on_demand_above)
            computed = common.logit_effects(run, feature_id)
            if isinstance(computed, str):
                st.caption(f"Not in this run, and not computable here: {render.md(computed)}")
            else:
                effects = computed
        promoted = list(zip(store.decode(effects[0] or []), effects[1] or [], strict=True))
        suppressed = list(zip(store.decode(effects[2] or []), effects[3] or [], strict=True))
        st.caption("Promoted")
        st.html(render.chips(promoted, color="pos"))
        st.caption("Suppressed")
        st.html(render.chips(suppressed, color="neg"))
        st.markdown("**Nearest latents** (decoder cosine)")
        neighbours = list(zip(row.neighbor_ids or [], row.neighbor_cos or [], strict=True))
        method = (store.manifest().get("neighbors") or {}).get("method")
        if row.neighbor_ids is None and method == "on_demand":  # a wide run leaves them to this page, exactly
            found = common.neighbors(run, feature_id)
            if isinstance(found, str):
                st.caption(f"Not in this run, and not computable here: {render.md(found)}")
            else:
                neighbours = list(zip(*found, strict=True))
        elif not neighbours and method == "pending":
            st.caption("Not in this first snapshot of a wide run: they are computed for the next snapshot.")
        labels = cache.describe(run, [i for i, _ in neighbours])
        for other, cos in neighbours:
            common.feature_link(other, labels.get(other, ""), suffix=f" · cos {cos:.2f}")

    examples = row.examples
    top = [e for e in examples if e.kind == "top"]
    scale = float(row.max_act or 1.0)
    st.subheader("Top activations")
    if not top:
        st.caption("No examples: this latent never fired on the run's contexts.")
    else:
        st.html("".join(example_html(e, scale) for e in top[:EXAMPLES_SHOWN]))
    if len(top) > EXAMPLES_SHOWN:
        with st.expander(f"{len(top) - EXAMPLES_SHOWN} more top examples"):
            st.html("".join(example_html(e, scale) for e in top[EXAMPLES_SHOWN:]))
    heads_view.show(run, row)
    quantile = [e for e in examples if e.kind == "quantile"]
    if quantile:
        st.subheader("Quantile examples")
        st.caption("Contexts sampled across the range of activations, strongest bin first: what weaker activations look like.")
        bins = groupby(sorted(quantile, key=lambda e: (-(e.quantile_bin or 0), e.rank)), key=lambda e: e.quantile_bin)
        for i, (bin_id, group) in enumerate(bins):
            group = list(group)
            acts = [e.max_act for e in group]
            with st.expander(f"Bin {bin_id}: max activations {fmt(min(acts))} – {fmt(max(acts))}", expanded=i < 2):
                st.html("".join(example_html(e, scale) for e in group[:PER_BIN * 3]))
