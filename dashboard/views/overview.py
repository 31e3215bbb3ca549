"""Overview: what the run is (model, hook, SAE, corpus) and how well the SAE does, with the density spectrum."""

import numpy as np
import streamlit as st

from dashboard import cache, charts, common, render
from dashboard.compare_view import EVALUATION
from dashboard.render import fmt
from engine.run.manifest import sections

EVALUATION_HELP = {
    "core/l2_ratio": "mean ‖x̂‖ / ‖x‖ over a token sample (below 1: shrinkage)",
    "core/relative_reconstruction_bias": "E‖x̂‖² / E[x·x̂] (Gated SAE paper, eq. 10): below 1, the SAE shrinks",
    "sparse_probing/sae_top_k_accuracy": "test accuracy of logistic probes on the k latents whose class means differ most, "
                                         "averaged over tasks (manual part, code vs prose)",
    "sparse_probing/llm_accuracy": "the same probe on every dimension of x: the ceiling",
    "absorption/mean_absorption_fraction": "first-letter task: share of the probe projection that other latents absorb "
                                           "when the letter's main latents fail",
}

run = common.current_run()
store = common.run_store(run)
man = store.manifest()
metrics = store.metrics()
run_info = sections(man)
model, sae, corpus = run_info.model, run_info.sae, run_info.corpus

st.title("Overview")
st.caption("Run " + render.code(run))

left, mid, right = st.columns(3)
with left.container(border=True):
    st.markdown("**Model**")
    st.markdown(render.code(model.name or "?"))
    st.caption(f"dtype {render.md(model.dtype or '?')} · hash {render.md(model.hash or '?')}")
with mid.container(border=True):
    st.markdown("**SAE**")
    st.markdown(f"{render.md(sae.architecture or '?')} · **{sae.d_sae or 0:,}** latents · "
                f"d_in {render.md(sae.d_in or '?')}")
    if sae.reads_writes:
        st.caption("transcoder: reads " + render.code(sae.hook_in or sae.hook or "?") + ", writes "
                   + render.code(sae.hook_out or "?") + (f" · k = {render.md(sae.k)}" if sae.k else ""))
    else:
        st.caption("hook " + render.code(sae.hook or "?") + (f" · k = {render.md(sae.k)}" if sae.k else ""))
with right.container(border=True):
    st.markdown("**Corpus**")
    st.markdown(render.code(corpus.name or "?"))
    st.caption(
        f"{corpus.n_tokens or 0:,} tokens · {corpus.n_contexts or 0:,} contexts of "
        f"{render.md(corpus.context_len or '?')} tokens"
    )

densities = store.densities()
dead = int((densities <= 0).sum())
dense = int((densities > 0.1).sum())
recorded = man.get("metrics") or {}
clean, with_sae = metrics.ce_loss_clean, metrics.ce_loss_with_sae
increase = metrics.ce_loss_increase  # runs written before it was recorded: from the two losses
if increase is None and clean is not None and with_sae is not None:
    increase = with_sae - clean
ci95, kl_ablation = metrics.ce_loss_increase_ci95, metrics.kl_div_with_ablation
ev_with, ev_without = metrics.explained_variance_with_massive, metrics.explained_variance_without_massive
if ev_with is None and ev_without is None:  # runs written before both were recorded: the statistic tokens' one
    counts_massive = bool(run_info.settings.get("include_massive"))
    ev_with, ev_without = (metrics.explained_variance, None) if counts_massive else (None, metrics.explained_variance)
# Four cards a row: at a 1366 px laptop width with the sidebar open each is ~210 px, enough for the whole label and
# value; the details go to the help text (and the interval under the value).
top, bottom = st.columns(4), st.columns(4)
top[0].metric("L0 (latents per token)", fmt(metrics.l0), help="Mean number of latents active on a counted token")
n_massive = "?" if metrics.n_massive_tokens is None else f"{metrics.n_massive_tokens:,}"
top[1].metric("Explained variance", fmt(ev_with),
              help="1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² over every counted token (all but position 0 and special tokens), "
                   f"the {n_massive} massive-activation tokens (norm ≥ 10× their batch's median) included")
top[2].metric("EV without massive tokens", fmt(ev_without),
              help="Explained variance without the massive-activation tokens (attention sinks beyond position 0, which "
                   "can dominate the variance)")
top[3].metric("CE loss increase (nats)", fmt(increase), delta=f"± {fmt(ci95)}" if ci95 else None, delta_color="off",
              delta_arrow="off", delta_description="95% interval" if ci95 else None,
              help="Mean next-token loss with the SAE spliced in minus clean, over "
                   f"{metrics.n_predictions or 0:,} predictions" + (" (± its 95% interval)" if ci95 else ""))
bottom[0].metric("CE loss recovered", fmt(metrics.ce_loss_recovered),
                 help="(CE zero-ablated − CE with SAE) / (CE zero-ablated − CE clean)")
bottom[1].metric("KL to clean", fmt(metrics.kl_div),
                 help="Mean KL divergence of next-token distributions, SAE spliced in vs clean"
                      + (f"; zero-ablated vs clean {fmt(kl_ablation)}, KL score {fmt(metrics.kl_score)}"
                         if kl_ablation else ""))
bottom[2].metric("Dead latents", render.compact(dead), help=f"{dead:,} latents never fired on this run's tokens")
bottom[3].metric("Dense latents", render.compact(dense), help=f"{dense:,} latents fire on more than 10% of tokens")
if "ce_loss_clean" in recorded:  # a run recording CE metrics (null ones: it had no CE sample)
    st.caption(
        f"Next-token loss: clean {fmt(metrics.ce_loss_clean)} · with the SAE {fmt(metrics.ce_loss_with_sae)} · "
        f"zero-ablated {fmt(metrics.ce_loss_zero_ablation)}"
        + (f" · KL score {fmt(metrics.kl_score)} (1 − KL with the SAE / KL zero-ablated {fmt(kl_ablation)})"
           if metrics.kl_score is not None else "")
    )

rule = (man.get("sae") or {}).get("inference_rule")
if rule:  # a batch- or gradient-dependent encoder: how this run's codes were made
    st.info(f"**Encoder rule ({render.md(sae.architecture)}):** {render.md(rule)}.")
gradient = (man.get("sae") or {}).get("gradient")
if gradient:
    st.caption("Loss gradient: " + render.md(gradient.get("source", "")) + ". Fallback: "
               + render.md(gradient.get("fallback", "")) + ". " + render.md(gradient.get("spliced_forwards", "")) + ".")
if sae.architecture not in ("topk", "gradient_topk"):  # a variable number of latents per token
    l0 = cache.l0_sample(run)
    if l0.size:
        st.subheader("Latents per token")
        st.plotly_chart(charts.l0_histogram(l0), key="l0_hist")
        q = np.percentile(l0, [5, 50, 95])
        st.caption(f"Over the {l0.size:,} tokens of the run's token sample: mean {fmt(float(l0.mean()))}, "
                   f"standard deviation {fmt(float(l0.std()))}, 5th / 50th / 95th percentile {q[0]:.0f} / {q[1]:.0f} / "
                   f"{q[2]:.0f}; {int((l0 == 0).sum()):,} tokens with no latent.")
widths = (man.get("sae") or {}).get("matryoshka_widths")
if widths:
    st.subheader("Matryoshka groups")
    starts = [0, *widths[:-1]]
    st.caption("Nested prefixes: group g holds latents " + " · ".join(
        f"{g + 1}: {a:,}–{b - 1:,}" for g, (a, b) in enumerate(zip(starts, widths, strict=True)))
        + ". Each prefix was trained to reconstruct on its own; filter the Features list by group.")
    if st.button("Score each prefix (EV and CE loss recovered on ~2,048 tokens of the run)", key="mat_curve"):
        with common.shown_errors("Could not score the prefixes"):
            points = cache.prefix_curve(run, common.model_source(man), common.sae_source(man), 2048)
            st.plotly_chart(charts.prefix_curve([p[0] for p in points], [p[2] for p in points], [p[4] for p in points]),
                            key="mat_curve_chart")
            st.dataframe({"width": [p[0] for p in points], "groups": [p[1] for p in points],
                          "explained variance": [p[2] for p in points], "L0 in prefix": [p[3] for p in points],
                          "CE loss recovered": [p[4] for p in points]}, hide_index=True)

st.subheader("Latent densities")
cap = (man.get("sae") or {}).get("capacity_density")  # a feature-choice SAE: each latent's cap in training
st.plotly_chart(charts.density_histogram(densities, cap=cap), key="density_hist")
if cap:
    over = int((densities > cap).sum())
    st.caption(f"Feature choice: in training each latent could pick at most {cap:.3%} of a batch's tokens (its cap, "
               f"dotted); with the inference thresholds {over:,} latents fire more often than that on this run.")
alive = densities[densities > 0]
if alive.size:
    st.caption(f"Median density of live latents {fmt(float(np.median(alive)))}; "
               f"{int((alive < 1e-4).sum()):,} fire on fewer than 1 in 10,000 tokens.")

evaluation = cache.evaluation(run)
if evaluation is not None:  # written by `saescope evaluate`
    values, meta, stale = evaluation
    st.subheader("Evaluation")
    if stale:
        st.warning("These results were computed for an earlier computation of this run: rerun `saescope evaluate`.")
    shown = [(key, label) for key, label in EVALUATION.items() if key in values]
    for start in range(0, len(shown), 3):  # three a row: "Probing: dense probe on x (ceiling)" shows whole at 1366 px
        for col, (key, label) in zip(st.columns(3), shown[start : start + 3], strict=False):
            col.metric(label, fmt(values[key]), help=EVALUATION_HELP.get(key.split("@")[0]))
    letters = values.get("absorption/letters_evaluated")
    if letters is not None and "absorption/mean_absorption_fraction" not in values:
        st.caption(f"Absorption: only {letters:.0f} letters have a first-letter probe with F1 > 0.6 (SAEBench needs 20).")
    st.caption("SAEBench-style metrics (definitions: docs/evaluation.md); "
               f"settings and timings in the file's metadata (CPU: {render.md((meta.get('machine') or {}).get('cpu', '?'))}).")

with st.expander("Manifest"):
    st.json(man, expanded=1)
