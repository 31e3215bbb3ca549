"""Dark matter: what the SAE misses, how much of it a linear map from x predicts, and where it costs loss."""

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, common, render
from dashboard.render import fmt
from engine.run.manifest import sections

SAMPLE_ROWS = 50_000  # token rows read for the distributions (the run's sample is usually smaller)

run = common.current_run()
store = common.run_store(run)
dm = store.dark_matter()
metrics = store.metrics()

st.title("Dark matter")
st.caption(
    "The SAE's error e = x − x̂, split as in “Decomposing the Dark Matter of SAEs”: a linear map fitted from x to e "
    "on held-in tokens (scored on held-out ones) predicts part of it; the rest is the nonlinear part."
)
if dm is None:
    common.fail("This run has no dark-matter statistics (its manifest has no `dark_matter` section).")
sae_info = sections(store.manifest()).sae
if sae_info.reads_writes:
    st.info("This run is a transcoder (reads " + render.code(sae_info.hook_in or sae_info.hook or "?") + ", writes "
            + render.code(sae_info.hook_out or "?") + "): here e = y − ŷ is the error of its "
            "prediction of the output hook y (the true MLP output), and the linear map predicts e from its input x "
            "(the MLP's normalised input). The paper fits SAE errors; this is the same fit on the transcoder's "
            "output-side error.")

cols = st.columns(4)  # short labels, the detail in the help: each card shows whole at a 1366 px laptop width
cols[0].metric("Error variance predicted", fmt(dm.heldout_error_r2),
               help=f"Held-out R² of the linear map x → e; on held-in tokens: {fmt(dm.train_error_r2)}")
cols[1].metric("‖e‖ predicted", fmt(dm.heldout_norm_r2),
               help=f"Held-out R² of a linear probe for ‖e‖ from x; on held-in tokens: {fmt(dm.train_norm_r2)}")
cols[2].metric("corr(‖linear part‖, ‖e‖)", fmt(dm.err_norm_corr), help="over the run's sampled tokens")
target = "y" if sae_info.reads_writes else "x"
cols[3].metric(f"Explained variance of {target}", fmt(metrics.explained_variance),
               help=f"1 − Σ‖e‖² / Σ‖{target} − mean {target}‖²")
st.caption(f"Held-out R². Map fitted on {dm.n_train_tokens or 0:,} tokens, scored on {dm.n_heldout_tokens or 0:,}; "
           f"per-token rows below come from {dm.n_token_rows or 0:,} sampled tokens.")
if dm.paper_heldout_error_r2_mean_dim is not None:
    st.markdown("**As the paper measures it** (least squares without bias, R² averaged per dimension, the squared "
                "norm ‖e‖² as the norm target, a random split of tokens)")
    paper = st.columns(4)
    paper[0].metric("Error predicted", fmt(dm.paper_heldout_error_r2_mean_dim),
                    help=f"Held-out R², averaged per dimension; on the fitting tokens: {fmt(dm.paper_train_error_r2_mean_dim)}")
    paper[1].metric("‖e‖² predicted", fmt(dm.paper_heldout_norm_sq_r2),
                    help=f"Held-out R²; on the fitting tokens: {fmt(dm.paper_train_norm_sq_r2)}")
    where = (f"positions {dm.paper_positions[0]}–{dm.paper_positions[1]}" if dm.paper_positions
             else "every counted position")
    split = (f"a seeded random split of tokens by (context, position) (seed {render.md(dm.paper_split_seed)}), "
             f"{fmt(dm.paper_heldout_fraction)} of the tokens held out; {where}")
    fitted, scored = dm.paper_n_train_tokens or 0, dm.paper_n_heldout_tokens or 0
    paper[2].metric("Tokens fitted", render.compact(fitted), help=f"{fitted:,} tokens: {split}")
    paper[3].metric("Tokens scored", render.compact(scored), help=f"{scored:,} tokens: {split}")
    st.caption("The first row is saescope's: a ridge fit with an intercept, R² pooled over dimensions, ‖e‖ as the "
               "norm target, contexts held out by id. docs/run-format.md defines both.")
    context_len = (store.manifest().get("settings") or {}).get("context_len")
    if context_len != 1024 or not dm.paper_positions:
        st.caption(f"This run's contexts are {render.md(context_len)} tokens ({render.md(where)}); the paper fitted on "
                   "1024-token contexts, positions 1–1022 (200–1022 for its ‖e‖² headline): `saescope precompute "
                   "--context-len 1024 --paper-positions 1:1022` reproduces that setting.")

rows = store.token_rows(order_by="err_norm", limit=SAMPLE_ROWS)
if not rows:
    common.fail("This run has no per-token error rows (its token sample is empty).")
st.subheader("Error norms")
st.plotly_chart(
    charts.value_histogram(
        {"‖e‖": [r.err_norm for r in rows], "linear part": [r.err_linear_norm for r in rows],
         "nonlinear part": [r.err_nonlinear_norm for r in rows]},
        x="norm",
    ),
    key="err_hist",
)

st.subheader("Contexts the SAE reconstructs worst")
st.caption("Tinted by each token's error norm above the run's typical error (hover for the values); "
           "sorted by mean error norm.")
common.restore_widgets("dark_matter", {"dm_worst": 5})
n_worst = st.slider("Contexts", 1, 20, key="dm_worst")
common.save_widgets("dark_matter", ("dm_worst",))
norms = np.array([r.err_norm for r in rows], dtype=np.float64)
floor, top = np.percentile(norms, 5), np.percentile(norms, 99.5)  # tint from the typical error up, for contrast
for ctx in store.worst_contexts(n_worst):
    titles = [f"{t!r}: ‖e‖ {fmt(e)} · nonlinear {fmt(nl)}" if e is not None else f"{t!r}: excluded"
              for t, e, nl in zip(ctx.tokens, ctx.err_norms, ctx.err_nonlinear_norms, strict=True)]
    st.markdown(f"Context {ctx.context_id} · mean ‖e‖ {fmt(ctx.mean_err_norm)} · max {fmt(ctx.max_err_norm)}")
    tints = [None if e is None else max(e - floor, 0.0) for e in ctx.err_norms]
    st.html(render.tokens_html(ctx.tokens, tints, scale=max(top - floor, 1e-9), color="error", titles=titles, breaks=False))

st.subheader("Next-token loss with the SAE spliced in")
deltas = [r.ce_delta for r in rows if r.ce_delta is not None]
if not deltas:
    st.info("This run measured no per-token loss (no sampled contexts).")
else:
    st.caption(f"ΔCE = loss of predicting the next token with the reconstruction in place of x − clean loss, per sampled token "
               f"(mean {fmt(sum(deltas) / len(deltas))}; CE loss recovered {fmt(metrics.ce_loss_recovered)}).")
    st.plotly_chart(charts.value_histogram({"ΔCE": deltas}, x="ΔCE (nats)", log_y=True), key="ce_hist")
    worst = store.token_rows(order_by="ce_delta", limit=20)
    st.dataframe(
        pd.DataFrame({
            "token": [render.visible(r.token) for r in worst],
            "context": [r.context_id for r in worst],
            "pos": [r.position for r in worst],
            "ΔCE": [r.ce_delta for r in worst],
            "CE clean": [r.ce_clean for r in worst],
            "CE with SAE": [r.ce_sae for r in worst],
            "‖e‖": [r.err_norm for r in worst],
            "nonlinear part": [r.err_nonlinear_norm for r in worst],
        }),
        hide_index=True, width="stretch",
    )
