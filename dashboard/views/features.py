"""Features: search latents by the meaning of their explanations, or by id, label or token; filter and sort them;
open one (``?feature=ID``)."""

from functools import partial

import pandas as pd
import streamlit as st

from dashboard import cache, common, feature_view, render

PAGE_SIZE = 50
SORT_KEYS = {
    "density": "Density", "max_act": "Max activation", "fire_count": "Fire count", "mean_act": "Mean activation",
    "feature_id": "Id",
}

WIDGETS = ("feat_query", "feat_by", "feat_density", "feat_score", "feat_sort", "feat_desc", "feat_dead", "feat_page",
           "feat_group")
BY = {"meaning": "meaning", "label": "top tokens", "token": "token", "id": "id"}

run = common.current_run()
store = common.run_store(run)
explained_run = bool(cache.interp(run).embedding_models())  # search by meaning is the default where it can work
common.restore_widgets("features", {"feat_density": (-8.0, 0.0), "feat_score": 0.0, "feat_desc": True, "feat_page": 1,
                                    "feat_by": "meaning" if explained_run else "label"})


def open_picked(key: str, ids: list[int]) -> None:
    rows = st.session_state[key].selection.rows
    if rows:
        st.query_params["feature"] = str(ids[rows[0]])
        st.session_state["feat_table_gen"] = st.session_state.get("feat_table_gen", 0) + 1  # a fresh, unselected table


def open_typed() -> None:
    if st.session_state.get("feat_goto") is not None:
        st.query_params["feature"] = str(int(st.session_state["feat_goto"]))
        st.session_state["feat_goto"] = None


if "feature" in st.query_params:
    feature_id = common.query_int("feature")
    if feature_id is None:
        common.fail(f"{render.code(st.query_params['feature'])} is not a feature id: ids are whole numbers.")
    feature_view.show(run, store, feature_id)
    st.stop()

n = store.n_features()
st.title("Features")
st.caption(f"{n:,} latents. Search, or filter and sort the list; select a row to open its page.")

c_text, c_by = st.columns([3, 2])
text = c_text.text_input("Search", key="feat_query", placeholder="what a latent is about, top-token words, a token, an id")
by = c_by.radio("Search by", list(BY), format_func=BY.__getitem__, horizontal=True, key="feat_by",
                help="meaning: latents whose explanation is closest in meaning to the query (offline sentence embeddings); "
                     "top tokens: words of the top-token label; token: latents that fire most on, or most promote, "
                     "exactly this token")

with st.expander("Filter and sort", expanded=not text):
    f1, f2, f3 = st.columns([3, 2, 2])
    density_range = f1.slider("Density range (log10)", -8.0, 0.0, step=0.5, key="feat_density",
                              help="Keep latents whose density lies in this range; the left end at -8 means no lower bound")
    assert isinstance(density_range, tuple)  # a range slider: restore_widgets gave it a (low, high) pair
    lo, hi = density_range
    sort_by = f2.selectbox("Sort by", list(SORT_KEYS), format_func=SORT_KEYS.__getitem__, key="feat_sort")
    descending = f2.toggle("Descending", key="feat_desc")
    include_dead = f3.toggle("Include dead latents", key="feat_dead")
    page = f3.number_input("Page", min_value=1, step=1, key="feat_page")
    min_score = f1.slider("Minimum explanation score (search by meaning)", 0.0, 1.0, step=0.05, key="feat_score",
                          help="Keep latents whose best explanation's mean score (detection, fuzzing, embedding) is at "
                               "least this; 0 keeps unscored ones too")

    widths = (store.manifest().get("sae") or {}).get("matryoshka_widths") or []
    groups = list(zip([0, *widths[:-1]], widths, strict=True)) if widths else []
    group = None
    if groups:  # a Matryoshka SAE: list one nested group
        picked = f2.selectbox("Matryoshka group", ["all", *range(1, len(groups) + 1)], key="feat_group",
                              format_func=lambda g: "all groups" if g == "all" else
                              f"group {g}: latents {groups[int(g) - 1][0]:,}–{groups[int(g) - 1][1] - 1:,}")
        group = None if picked == "all" else range(*groups[int(picked) - 1])

common.save_widgets("features", WIDGETS)

def by_meaning(query: str) -> None:
    """Latents ranked by cosine between the query and their best explanation, with the filters applied."""
    search = cache.semantic(run)
    if not len(search):
        st.info("This run has no embedded explanations to search by meaning yet: "
                "`saescope explain RUN` writes them (or search by top tokens, token or id).")
        return
    embedder = cache.embedder()
    if search.model != embedder.name:
        st.warning(f"The explanations were embedded with {render.code(search.model)}, not {render.code(embedder.name)}: "
                   "similarities are not comparable.")
    hits = search.search_text(query, embedder, k=PAGE_SIZE, min_density=None if lo <= -8 else 10**lo,
                              max_density=None if hi >= 0 else 10**hi, min_score=min_score or None)
    st.caption(f"{len(hits)} latents closest in meaning to {render.md(repr(query))} among {len(search):,} explained"
               + (f", best explanation scoring at least {min_score:.2f}" if min_score else ""))
    if not hits:
        st.info("No explained latent passes these filters.")
        return
    table = pd.DataFrame({
        "id": [h.feature_id for h in hits],
        "explanation": [h.text or "" for h in hits],
        "similarity": [h.similarity for h in hits],
        "score": [h.score for h in hits],
        "density": [h.density for h in hits],
    })
    key = f"feat_meaning_{st.session_state.get('feat_table_gen', 0)}"
    st.dataframe(table, hide_index=True, width="stretch", selection_mode="single-row", key=key,
                 on_select=partial(open_picked, key, table["id"].tolist()),
                 column_config={"similarity": st.column_config.NumberColumn(format="%.3f"),
                                "score": st.column_config.NumberColumn(format="%.3f"),
                                "density": st.column_config.NumberColumn(format="%.2e")})


with common.shown_errors("Search failed"):
    rows = None
    if text.strip() and by == "meaning":
        by_meaning(text.strip())
    elif text.strip():
        rows = store.search(text.strip(), by=by, limit=PAGE_SIZE)
        st.caption(f"{len(rows)} match{'es' if len(rows) != 1 else ''} for {render.md(repr(text.strip()))} by {by}"
                   + (" (showing the first 50)" if len(rows) == PAGE_SIZE else ""))
    else:
        rows = store.top_features(
            sort_by=sort_by, descending=descending, include_dead=include_dead,
            min_density=None if lo <= -8 else 10**lo, max_density=None if hi >= 0 else 10**hi,
            limit=PAGE_SIZE, offset=(int(page) - 1) * PAGE_SIZE, latents=group,
        )

    if rows is not None:
        explained = cache.explanations(run, [r.feature_id for r in rows])
        intruder = cache.intruder(run, [r.feature_id for r in rows])
        table = pd.DataFrame(
            {
                "id": [r.feature_id for r in rows],
                "explanation": [explained.get(r.feature_id, "") for r in rows],
                "label": [r.label or "" for r in rows],
                "density": [r.density for r in rows],
                "max act": [r.max_act for r in rows],
                "mean act": [r.mean_act for r in rows],
                "fires": [r.fire_count for r in rows],
            }
        )
        if intruder:  # the intruder check (saescope explain --scorers intruder): chance is 0.2
            table.insert(2, "intruder", [intruder.get(r.feature_id) for r in rows])
        only = cache.gradient_only_counts(run)
        if only is not None:  # a g-SAE run: the share of each latent's firings the gradient alone admitted
            table["gradient only"] = [only[r.feature_id] / r.fire_count if r.fire_count else None for r in rows]
        if rows:
            key = f"feat_table_{st.session_state.get('feat_table_gen', 0)}"
            st.dataframe(
                table, hide_index=True, width="stretch", selection_mode="single-row", key=key,
                on_select=partial(open_picked, key, table["id"].tolist()),
                column_config={
                    "density": st.column_config.NumberColumn(format="%.2e"),
                    "max act": st.column_config.NumberColumn(format="%.3f"),
                    "mean act": st.column_config.NumberColumn(format="%.3f"),
                    "intruder": st.column_config.NumberColumn(
                        format="%.2f", help="Fraction of intruder checks a judge got right (chance 0.2)"),
                    "gradient only": st.column_config.NumberColumn(
                        format="percent", help="g-SAE: share of the latent's firings admitted by the gradient alone (it "
                        "would not fire under plain TopK over z at those tokens)"),
                },
            )
        elif not text.strip():
            st.info("No latent matches these filters.")


st.number_input("Open feature by id", min_value=0, max_value=max(n - 1, 0), value=None, step=1, key="feat_goto",
                placeholder=f"0 – {n - 1:,}", on_change=open_typed)
