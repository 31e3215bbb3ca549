"""Features: search latents by id, label or token; filter and sort them; open one (``?feature=ID``)."""

from functools import partial

import pandas as pd
import streamlit as st

from dashboard import common, feature_view

PAGE_SIZE = 50
SORT_KEYS = {
    "density": "Density", "max_act": "Max activation", "fire_count": "Fire count", "mean_act": "Mean activation",
    "feature_id": "Id",
}

WIDGETS = ("feat_query", "feat_by", "feat_density", "feat_sort", "feat_desc", "feat_dead", "feat_page")

run = common.current_run()
store = common.run_store(run)
common.restore_widgets("features", {"feat_density": (-8.0, 0.0), "feat_desc": True, "feat_page": 1})


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
        common.fail(f"`{st.query_params['feature']}` is not a feature id: ids are whole numbers.")
    feature_view.show(run, store, feature_id)
    st.stop()

n = store.n_features()
st.title("Features")
st.caption(f"{n:,} latents. Search, or filter and sort the list; select a row to open its page.")

c_text, c_by = st.columns([3, 2])
text = c_text.text_input("Search", key="feat_query", placeholder="words from a label, a token, or an id")
by = c_by.radio("Search by", ["label", "token", "id"], horizontal=True, key="feat_by",
                help="token: latents that fire most on, or most promote, exactly this token")

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

common.save_widgets("features", WIDGETS)

with common.shown_errors("Search failed"):
    if text.strip():
        rows = store.search(text.strip(), by=by, limit=PAGE_SIZE)
        st.caption(f"{len(rows)} match{'es' if len(rows) != 1 else ''} for {text.strip()!r} by {by}"
                   + (" (showing the first 50)" if len(rows) == PAGE_SIZE else ""))
    else:
        rows = store.top_features(
            sort_by=sort_by, descending=descending, include_dead=include_dead,
            min_density=None if lo <= -8 else 10**lo, max_density=None if hi >= 0 else 10**hi,
            limit=PAGE_SIZE, offset=(int(page) - 1) * PAGE_SIZE,
        )
    table = pd.DataFrame(
        {
            "id": [r.feature_id for r in rows],
            "label": [r.label or "" for r in rows],
            "density": [r.density for r in rows],
            "max act": [r.max_act for r in rows],
            "mean act": [r.mean_act for r in rows],
            "fires": [r.fire_count for r in rows],
        }
    )
    if rows:
        key = f"feat_table_{st.session_state.get('feat_table_gen', 0)}"
        st.dataframe(
            table, hide_index=True, width="stretch", selection_mode="single-row", key=key,
            on_select=partial(open_picked, key, table["id"].tolist()),
            column_config={
                "density": st.column_config.NumberColumn(format="%.2e"),
                "max act": st.column_config.NumberColumn(format="%.3f"),
                "mean act": st.column_config.NumberColumn(format="%.3f"),
            },
        )
    elif not text.strip():
        st.info("No latent matches these filters.")

st.number_input("Open feature by id", min_value=0, max_value=max(n - 1, 0), value=None, step=1, key="feat_goto",
                placeholder=f"0 – {n - 1:,}", on_change=open_typed)
