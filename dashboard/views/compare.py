"""Compare: runs of SAEs on one model and hook side by side (``?a=RUN&b=RUN&latent=N``): eval cards, curves
across widths, latents matched by decoder cosine with their activation correlation, and feature splitting."""

import shlex
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import access, cache, charts, common, compare_view, render
from dashboard.render import fmt
from engine.eval.files import find_comparison

runs = compare_view.known_runs()
st.title("Compare")
for folder in compare_view.family_tables():
    st.subheader(f"Family table: {render.md(folder.name)}")
    compare_view.family_table(folder)
if len(runs) < 2:
    st.info("Comparing needs two runs or more of SAEs on the same model and hook: serve a directory of runs "
            "(`saescope serve --run data/runs`).", icon=":material/compare_arrows:")
    st.stop()
names = list(runs)
identities = {n: compare_view.identity(p) for n, p in runs.items()}
peers = compare_view.peers(identities)
if not any(peers.values()):
    st.info("No two of these runs can be compared: comparing needs SAEs on the same model and hook point. Runs served: "
            + compare_view.describe_runs(names, identities) + ".", icon=":material/compare_arrows:")
    st.stop()
comparable = [n for n in names if peers[n]]
linked_a, linked_b = st.query_params.get("a"), st.query_params.get("b")
if st.session_state.get("cmp_a") not in comparable:  # first visit (a shared link may name the runs), or its run is gone
    if linked_a in runs and linked_b in runs and linked_a != linked_b and linked_b not in peers[linked_a]:
        st.warning(f"{render.code(linked_a)} and {render.code(linked_b)} are not SAEs on the same model and hook point, "
                   "so their latents cannot be compared. Runs that can be are grouped here: "
                   + compare_view.describe_runs(names, identities) + ".")
    pair = compare_view.opening_pair(peers, linked_a, linked_b, st.session_state.get("run_choice"))
    assert pair is not None  # some run has a peer
    st.session_state["cmp_a"], st.session_state["cmp_b"] = pair
left, right = st.columns(2)
a = left.selectbox("Run A", comparable, key="cmp_a")
if st.session_state.get("cmp_b") not in peers[a]:
    st.session_state["cmp_b"] = linked_b if linked_b in peers[a] else peers[a][0]
b = right.selectbox("Run B", peers[a], key="cmp_b", help="the runs of SAEs on the same model and hook point as run A")
alone = [n for n in names if not peers[n]]
if alone:
    st.caption("Not offered (no other run on the same model and hook point): "
               + compare_view.describe_runs(alone, identities) + ".")
if (linked_a, linked_b) != (a, b):
    st.query_params.pop("latent", None)  # a latent id of another pair of runs
st.query_params.update({"a": a, "b": b})
pa, pb = runs[a], runs[b]

st.subheader("Eval cards")
same = [a, *peers[a]]
shown = [a, b] + [n for n in same if n not in (a, b)]
compare_view.cards(shown, [runs[n] for n in shown])
if len(same) >= 3:
    st.subheader("Across widths")
    compare_view.width_curves([runs[n] for n in same])

found = find_comparison(pa, pb)
st.subheader("Matched latents")
if found is None:
    st.info(f"No comparison of these runs yet: {render.code(shlex.join(['saescope', 'compare', pa, pb]))} computes it "
            "(decoder matches, a one-to-one assignment, activation correlations and co-firing on a token sample)"
            + ("." if access.read_only() else ", or compute it here."))
    if access.write_button("Compare now", writes="comparisons into the runs", type="primary",
                           icon=":material/play_arrow:"):
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
method = info["assignment"]["method"]
cols = st.columns(5)  # short labels, the detail in the help: each card shows whole at a 1366 px laptop width
cols[0].metric("Mean best cos", fmt(s["mean_best_cos"]),
               help=f"Decoder cosine of each latent of {render.md(narrow)} with its closest latent of {render.md(wide)}, "
                    "averaged")
cols[1].metric("Best cos > 0.9", fmt(s["frac_best_cos_over_0.9"]),
               help=f"Share of the latents of {render.md(narrow)} whose closest latent has decoder cosine above 0.9")
cols[2].metric("One-to-one pairs", render.compact(s["n_assigned"]),
               help=f"{s['n_assigned']:,} pairs; assignment: {render.md(method)} "
                    f"({'exact LSA on the sparsified similarity' if method == 'lsa' else 'greedy by cosine'})")
cols[3].metric("Pair correlation", fmt(s["mean_assigned_corr"]),
               help="Mean Pearson correlation of the one-to-one pairs' activations over the sample")
cols[4].metric("Split latents", render.compact(s["n_split"]),
               help=f"{s['n_split']:,} latents of {render.md(narrow)} split into {s['n_children']:,} of {render.md(wide)}")
st.caption(f"Sample: {info['sample']['n_tokens']:,} tokens of {render.code(Path(info['sample']['from_run']).name)}, model "
           f"and both SAEs run once (CPU: {render.md(info['machine']['cpu'])}); comparison folder {render.code(folder)}.")
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
    st.caption(f"A latent of {render.md(narrow)} is split when two latents of {render.md(wide)} or more have decoder cosine ≥ "
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
    st.subheader(f"Latent #{latent} of {render.md(a)} and its counterparts in {render.md(b)}")
    compare_view.latent_panel(pa, pb, latent, str(folder), swapped)
