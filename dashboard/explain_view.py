"""A latent's explanations on its feature page: the best one with its scores, what each scorer got wrong, the
other explainers' explanations, and (when an explainer is configured) explaining the latent live."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from dashboard import access, cache, render
from dashboard.render import fmt

if TYPE_CHECKING:
    from engine.interp.rows import Explanation
    from engine.interp.scorers import ExcerptResult, ScoreDetail
    from engine.run.rows import FeatureRow
    from engine.run.store import RunStore

SCORER_HELP = {
    "detection": "Balanced accuracy of a judge model telling held-out contexts where the latent fires from ones where "
                 "it does not, given only the explanation (0.5 = chance).",
    "fuzzing": "Balanced accuracy of a judge model telling correctly marked activating tokens from randomly marked "
               "ones, given the explanation (0.5 = chance).",
    "embedding": "AUROC of the cosine between the explanation and held-out contexts (activating vs not) in a "
                 "sentence-embedding space (0.5 = chance).",
    "intruder": "Fraction of groups of four top-activating excerpts and one non-activating intruder in which a judge "
                "picked the intruder, with no explanation: it measures the latent itself (0.2 = chance).",
}
WRONG_SHOWN = 6


def _score_cells(expl: Explanation) -> str:
    return " · ".join(f"{s} {fmt(v)}" for s, v in sorted(expl.scores.items())) or "unscored"


def excerpt_html(result: ExcerptResult, row: FeatureRow, store: RunStore) -> str:
    """The excerpt a scorer saw, tinted by the latent's activation where it fired (escaped like every token)."""
    if result.window is None:
        return render.tokens_html([f"context {result.context_id} (window not recorded)"], [0.0])
    lo, hi = result.window
    for ex in row.examples:
        if ex.context_id == result.context_id and ex.start <= lo and hi <= ex.start + len(ex.acts):
            a, b = lo - ex.start, hi - ex.start
            return render.tokens_html(ex.tokens[a:b], ex.acts[a:b], scale=float(row.max_act or 1.0), breaks=False)
    context = store.context(result.context_id)
    if context is None:
        return render.tokens_html([f"context {result.context_id} is not in this run"], [0.0])
    tokens = context.tokens[lo:hi]
    return render.tokens_html(tokens, [0.0] * len(tokens), breaks=False)


def _value(detail: ScoreDetail, result: ExcerptResult) -> str:
    if detail.scorer == "embedding":
        return f"cosine {fmt(result.value)}, ranked past {result.misordered} of the other class"
    return f"judge P(fires) {fmt(result.value)}"


def quantile_table(details: list[ScoreDetail]) -> pd.DataFrame | None:
    """Each scorer's score per activation quantile (rows: the highest quantile first, then the non-activating
    excerpts), or None when none was recorded."""
    keys = sorted({q for d in details for q in d.by_quantile}, key=lambda q: (q < 0, q))
    if not keys:
        return None
    index = ["non-activating" if q < 0 else f"quantile {q}" + (" (highest)" if q == 0 else "") for q in keys]
    return pd.DataFrame({d.scorer: [d.by_quantile.get(q) for q in keys] for d in details if d.by_quantile}, index=index)


def confusion(detail: ScoreDetail, row: FeatureRow, store: RunStore) -> None:
    """One scorer's result: its counts, and the held-out excerpts it got wrong."""
    excerpts = detail.excerpts
    if detail.failed:
        st.caption(f"{detail.failed} judgement{'s' if detail.failed != 1 else ''} failed (the judge answered "
                   f"off-format: {fmt(detail.failure_rate)} of them), left out of the score.")
    if not excerpts:
        st.caption("No per-excerpt details were recorded for this score.")
        return
    pos = [e for e in excerpts if e.activating]
    neg = [e for e in excerpts if not e.activating]
    missed, alarms = detail.missed, detail.false_alarms
    if detail.scorer == "embedding":
        st.caption(f"{len(pos)} activating and {len(neg)} non-activating held-out excerpts, ranked by cosine to the "
                   f"explanation: {len(missed)} activating ones rank below a non-activating one, {len(alarms)} "
                   "non-activating ones above an activating one.")
    else:
        table = pd.DataFrame({"judged: fires": [len(pos) - len(missed), len(alarms)],
                              "judged: does not": [len(missed), len(neg) - len(alarms)]},
                             index=["fires (held out)", "does not fire"])
        st.dataframe(table, width="content")
    for title, group in (("Missed: the latent fires here", missed), ("False alarms: the latent does not fire here", alarms)):
        if not group:
            continue
        st.markdown(f"**{title}** ({len(group)})")
        worst = sorted(group, key=lambda e: -e.misordered if detail.scorer == "embedding" else 0)[:WRONG_SHOWN]
        for result in worst:
            st.caption(_value(detail, result))
            st.html(excerpt_html(result, row, store))


def show(run: str, store: RunStore, row: FeatureRow) -> None:
    """The explanation panel of one latent's page."""
    feature_id = int(row.feature_id)
    try:
        every = cache.interp(run).explanations(feature_id)
    except Exception as err:  # a damaged explanation file must not take the feature page down
        st.warning(f"Could not read this run's explanations: {render.md(err)}")
        every = []
    usable = [e for e in every if e.text and not e.is_baseline]
    if usable:
        best = usable[0]
        st.markdown(f"#### {render.md(best.text)}")
        when = f" · {best.created_at:%Y-%m-%d %H:%M}" if best.created_at else ""
        st.caption(f"Explained by {render.md(best.explainer)} (prompt {render.md(best.prompt_version)}){when}. "
                   f"Top tokens: {render.md(row.label or 'none')}")
    elif row.explanation:  # written into features.parquet by whoever made the run
        st.markdown(f"#### {render.md(row.explanation)}")
        st.caption(f"Explanation stored with the run (unscored). Top tokens: {render.md(row.label or 'none')}")
    else:
        reason = next((e.reason for e in every if not e.is_baseline and e.reason), "")
        st.markdown(f"**{render.md(row.label or 'no label')}**")
        st.caption("Top tokens. No written explanation yet" + (f" ({render.md(reason)})" if reason else "")
                   + f": `saescope explain RUN --features {feature_id}` writes one"
                   + ("." if cache.explainer_spec() else ", or start the app with `saescope serve --explainer demo` "
                      "(or an OpenAI-compatible endpoint) to explain latents from this page."))
    live_explain(run, feature_id, again=bool(usable))
    if not usable:
        return
    best = usable[0]
    details = cache.interp(run).scores(feature_id, best.explainer, best.prompt_version)
    if details:
        cols = st.columns(len(details))
        for col, detail in zip(cols, details, strict=True):
            col.metric(render.md(detail.scorer.capitalize()), fmt(detail.score), help=SCORER_HELP.get(detail.scorer),
                       delta=None if detail.auroc is None or detail.scorer == "embedding" else f"AUROC {detail.auroc:.2f}",
                       delta_color="off")
        table = quantile_table(details)
        if table is not None:
            with st.expander("Scores per activation quantile"):
                st.caption("Activating excerpts: the fraction judged active (embedding: AUROC against every "
                           "non-activating excerpt); non-activating: the fraction judged inactive. Quantiles are "
                           "equal-width intervals of the latent's activation range, 0 the highest.")
                st.dataframe(table.map(lambda v: None if v is None else round(float(v), 3)), width="content")
        with st.expander("What the scorers got wrong"):
            tabs = st.tabs([render.md(d.scorer) for d in details])
            for tab, detail in zip(tabs, details, strict=True):
                with tab:
                    confusion(detail, row, store)
    if len(every) > 1:
        with st.expander(f"All {len(every)} explanations of this latent (best first)"):
            st.dataframe(pd.DataFrame({
                "explanation": [e.text or f"({e.status}: {e.reason})" for e in every],
                "explainer": [e.explainer for e in every],
                "prompt": [e.prompt_version for e in every],
                "scores": [_score_cells(e) for e in every],
                "mean": [e.mean_score for e in every],
            }), hide_index=True, width="stretch", column_config={"mean": st.column_config.NumberColumn(format="%.3f")})


FLASH = "explain_flash"


def live_explain(run: str, feature_id: int, *, again: bool) -> None:
    """"Explain this latent now": the configured explainer's words streamed as they come, then scored (embedding)
    and stored in the run as ``saescope explain`` stores them; the page then shows the new explanation."""
    flash = st.session_state.pop(FLASH, None)
    if flash and flash[0] == feature_id:
        (st.success if flash[1] == "ok" else st.warning)(flash[2])
    configured = cache.explainer_spec()
    if configured is None:
        return
    label = "Explain again now" if again else "Explain this latent now"
    if not access.write_button(label, writes="explanations into the run", icon=":material/auto_awesome:",
                               key=f"explain_now_{feature_id}",
                               help=f"Ask {render.md(configured[1] or configured[0])} now; the answer is scored and "
                                    "stored in the run"):
        return
    from engine.interp.backends import EndpointError
    from engine.interp.live import Streamed, explain_latent

    try:
        explainer, embedder = cache.explainer(), cache.embedder()
        with st.spinner("Preparing the latent's excerpts…"):
            streamed = Streamed(explain_latent(run, feature_id, explainer, embedder=embedder))
        st.write_stream(render.md(piece) for piece in streamed)
    except (EndpointError, ValueError, OSError, RuntimeError) as err:
        st.error(f"Could not explain latent {feature_id}: {render.md(err)}", icon=":material/error:")
        return
    result = streamed.result
    if result is None:
        return
    if result.status == "ok" and result.written:
        scores = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(result.scores.items()))
        st.session_state[FLASH] = (feature_id, "ok", f"Stored {render.md(result.text)}" + (f" ({scores})" if scores else ""))
    else:
        why = render.md(result.reason or result.status)
        kept = "recorded as failed" if result.written else "not stored: the usable explanation stays"
        st.session_state[FLASH] = (feature_id, "warn", f"The answer was not usable ({why}); {kept}. "
                                   f"Answer: {render.md(result.answer[:120])}")
    st.rerun()
