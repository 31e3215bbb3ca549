"""Compare: runs of SAEs on one model and hook side by side (``?a=RUN&b=RUN&latent=N``): eval cards, curves
across widths, latents matched by decoder cosine with their activation correlation, and feature splitting."""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, charts, common, compare_view
from dashboard.render import fmt
from engine.eval.files import find_comparison

runs = compare_view.known_runs()
st.title("Compare")
if len(runs) < 2:
    st.info("Comparing needs two runs or more of SAEs on the same model and hook: serve a directory of runs "
            "(`saescope serve --run data/runs`).", icon=":material/compare_arrows:")
    st.stop()
names = list(runs)
if "cmp_a" not in st.session_state:  # first visit: a shared link may name the runs
    wanted = st.query_params.get("a")
    st.session_state["cmp_a"] = wanted if wanted in runs else st.session_state.get("run_choice", names[0])
left, right = st.columns(2)
a = left.selectbox("Run A", names, key="cmp_a")
others = [n for n in names if n != a]
same = [n for n in others if compare_view.identity(runs[n]) == compare_view.identity(runs[a])]
wanted = st.query_params.get("b")
if st.session_state.get("cmp_b") not in others:
    st.session_state["cmp_b"] = wanted if wanted in others else (same or others)[0]
b = right.selectbox("Run B", others, key="cmp_b")
if (st.query_params.get("a"), st.query_params.get("b")) != (a, b):
    st.query_params.pop("latent", None)  # a latent id of another pair of runs
st.query_params.update({"a": a, "b": b})
pa, pb = runs[a], runs[b]
if compare_view.identity(pa) != compare_view.identity(pb):
    common.fail(f"`{a}` and `{b}` are not SAEs on the same model and hook point (model hash, hook, d_in: "
                f"{compare_view.identity(pa)} vs {compare_view.identity(pb)}), so their latents cannot be compared.")

st.subheader("Eval cards")
peers = [n for n in names if compare_view.identity(runs[n]) == compare_view.identity(pa)]
shown = [a, b] + [n for n in peers if n not in (a, b)]
compare_view.cards(shown, [runs[n] for n in shown])
if len(peers) >= 3:
    st.subheader("Across widths")
    compare_view.width_curves([runs[n] for n in peers])

found = find_comparison(pa, pb)
st.subheader("Matched latents")
if found is None:
    st.info(f"No comparison of these runs yet: `saescope compare {pa} {pb}` computes it (decoder matches, a one-to-one "
            "assignment, activation correlations and co-firing on a token sample), or compute it here.")
    if st.button("Compare now", type="primary", icon=":material/play_arrow:"):
        from engine.eval.compare import CompareConfig, compare_runs

        source, dtype = common.model_source(cache.manifest(pa))
        with st.spinner("Running the model and both SAEs on a sample of the run…"), common.shown_errors("Comparing failed"):
            compare_runs([pa, pb], cfg=CompareConfig(tokens=8192), lm=cache.model(source, dtype, cache.device()))
            st.rerun()
    st.stop()

folder, swapped = found
info, tables = cache.comparison(str(folder))
narrow, wide = (b, a) if swapped else (a, b)
m, mb, pairs = tables["matches.parquet"], tables["matches_b.parquet"], tables["pairs.parquet"]
s = info["summary"]
cols = st.columns(5)
cols[0].metric("Mean best-match cos", fmt(s["mean_best_cos"]),
               help=f"decoder cosine of each latent of {narrow} with its closest latent of {wide}, averaged")
cols[1].metric("Share with cos > 0.9", fmt(s["frac_best_cos_over_0.9"]))
cols[2].metric("One-to-one pairs", f"{s['n_assigned']:,}", help=f"assignment: {info['assignment']['method']} "
               f"({'exact LSA on the sparsified similarity' if info['assignment']['method'] == 'lsa' else 'greedy by cosine'})")
cols[3].metric("Activation corr. of pairs", fmt(s["mean_assigned_corr"]), help="mean Pearson correlation over the sample")
cols[4].metric("Split latents", f"{s['n_split']:,}", help=f"{s['n_children']:,} children in {wide}")
st.caption(f"Sample: {info['sample']['n_tokens']:,} tokens of `{Path(info['sample']['from_run']).name}`, model and both SAEs "
           f"run once (CPU: {info['machine']['cpu']}); comparison folder `{folder}`.")
h1, h2 = st.columns(2)
cos_series = {f"{narrow} → {wide}": m["best_cos"].tolist(), f"{wide} → {narrow}": mb["best_cos"].tolist()}
h1.plotly_chart(charts.value_histogram(cos_series, x="decoder cosine of the best match", y="latents"), key="cmp_cos_hist")
corr_series = {"one-to-one pairs": m["partner_corr"].tolist(), "best matches": m["best_corr"].tolist()}
h2.plotly_chart(charts.value_histogram(corr_series, x="activation correlation over the sample", y="latents"),
                key="cmp_corr_hist")

tab_pairs, tab_splits = st.tabs(["Matched pairs", "Feature splitting"])
with tab_pairs:
    view = m.sort_values("partner_corr", ascending=False, na_position="last").head(200)
    ids = view["a_id"].astype(int).tolist()
    st.dataframe(pd.DataFrame({
        f"{narrow}": ids, f"{wide} (one-to-one)": view["partner_b"], "cos": view["partner_cos"], "corr": view["partner_corr"],
        f"best in {wide}": view["best_b"], "best cos": view["best_cos"], "fires (sample)": view["a_fires"],
    }), hide_index=True, width="stretch", selection_mode="single-row", key="cmp_pairs",
        on_select=partial(compare_view.pick_latent, "cmp_pairs", ids))
with tab_splits:
    split = m[m["n_children"] >= 2].sort_values("n_children", ascending=False)
    ids = split["a_id"].astype(int).tolist()
    kids = pairs[pairs["child"]].groupby("a_id")["b_id"].apply(lambda s: ", ".join(f"#{i}" for i in s))
    st.caption(f"A latent of {narrow} is split when two latents of {wide} or more have decoder cosine ≥ "
               f"{info['settings']['split_cos']} with it and fire where it fires (≥ {info['settings']['cofire']:.0%} of their "
               "firings). Select one to see them side by side.")
    st.dataframe(pd.DataFrame({f"{narrow}": ids, "children": split["n_children"].tolist(),
                               f"in {wide}": [kids.get(i, "") for i in ids], "fires (sample)": split["a_fires"].tolist()}),
                 hide_index=True, width="stretch", selection_mode="single-row", key="cmp_splits",
                 on_select=partial(compare_view.pick_latent, "cmp_splits", ids))

latent = common.query_int("latent")
if latent is None and not swapped and (m["n_children"] >= 2).any():  # show the most split latent until one is picked
    latent = int(m["a_id"].to_numpy()[np.argmax(m["n_children"].to_numpy())])
if latent is not None:
    st.subheader(f"Latent #{latent} of {a} and its counterparts in {b}")
    compare_view.latent_panel(pa, pb, latent, str(folder), swapped)
