"""What every page needs: the current run, its store, the live model and SAE, links between pages.

Failures become a message in the page (``st.error`` then ``st.stop``), never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import streamlit as st

from dashboard import cache, render
from engine.run.manifest import sections
from engine.run.rows import FeatureSummary
from engine.run.rundir import PARTIAL, writer_alive
from engine.run.schema import MANIFEST

if TYPE_CHECKING:
    from engine.run.store import RunStore

WATCH_SECONDS = 5
"""How often a page of a run still being computed looks for a newer snapshot."""

FEATURES_PAGE = "views/features.py"
STEERING_PAGE = "views/steering.py"
LENS_PAGE = "views/lens.py"


def fail(message: str) -> NoReturn:
    """Show ``message`` as the page's error and end this script run."""
    st.error(message, icon=":material/error:")
    st.stop()


@contextlib.contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """Turn an exception inside the block into an error message (Streamlit's own stop/rerun pass through)."""
    try:
        yield
    except Exception as err:
        st.error(f"{what}: {render.md(err)}", icon=":material/error:")


def _multi_root() -> Path | None:
    root = cache.run_root()
    if root is None or (root / MANIFEST).is_file() or (root / PARTIAL).is_dir() or not root.is_dir():
        return None
    return root


def run_picker() -> None:
    """A sidebar picker when the server was given a directory of runs; the choice is kept in the URL (``run=``)."""
    root = _multi_root()
    if root is None:
        return
    runs = [Path(r).name for r in cache.list_runs(str(root))]
    if not runs:
        return
    choice = st.session_state.get("run_choice")  # a plain key: widget state is dropped when pages switch
    if choice not in runs:  # first visit (a shared link may name the run), or the run is gone
        wanted = st.query_params.get("run")
        choice = wanted if wanted in runs else runs[0]
    name = st.sidebar.selectbox("Run", runs, index=runs.index(choice), key="run_picker", help=f"runs under {render.code(root)}")
    st.session_state["run_choice"] = name
    st.query_params["run"] = name


def current_run() -> str:
    """The selected run directory, after checking it is complete; otherwise a message and stop."""
    root = cache.run_root()
    if root is None:
        fail("No run to show: start the app with `saescope serve --run RUN_DIR` (or `saescope demo`).")
    if not root.exists():
        fail(f"The run directory {render.code(root)} does not exist.")
    multi = _multi_root()
    if multi is not None:
        name = st.session_state.get("run_choice")
        if not name:
            fail(
                f"{render.code(root)} holds no complete run (no sub-directory with a `{MANIFEST}`). "
                "Precompute one with `saescope precompute`, or wait for a running precompute to finish."
            )
        run = multi / name
    else:
        run = root
    if not (run / MANIFEST).is_file():
        if (run / PARTIAL).is_dir():  # a precompute is writing it: its first snapshot will do
            st.info(
                f"A precompute is writing {render.code(run)}; its first snapshot (after ~16k tokens) is not there yet. "
                "This page opens it by itself as soon as it is.", icon=":material/hourglass_top:",
            )
            _watch_run(str(run), 0.0)
            st.stop()
        fail(
            f"{render.code(run)} has no `{MANIFEST}`: the run is incomplete (its precompute was interrupted before its first "
            "snapshot). Run `saescope precompute` again to finish it."
        )
    live_notice(str(run))
    return str(run)


def live_notice(run: str) -> None:
    """For a snapshot of a run still being computed: how many tokens the page reflects, and a watcher that
    reruns the page when a newer snapshot lands (no restart needed)."""
    try:
        man = cache.manifest(run)
    except Exception:
        return
    snap = sections(man).snapshot
    if snap.final:
        return
    seen, target = snap.seen_tokens or 0, snap.target_tokens
    where_in = f"{seen:,} of {target:,} tokens ({seen / target:.0%}, " if target else f"the first {seen:,} tokens ("
    share = f"{where_in}snapshot {render.md(snap.index)})"
    alive = writer_alive(man)
    if alive is False:
        st.warning(
            f"This run is partial: it reflects {share}, and the precompute that was "
            "writing it has stopped. Run `saescope precompute` again for the whole corpus.",
            icon=":material/pause_circle:",
        )
        return
    where = "" if alive else f" on {render.md(snap.host)}"
    st.info(
        f"Still computing{where}: this page reflects {share}. "
        "Refinement continues; the page updates itself when the next snapshot lands.",
        icon=":material/autorenew:",
    )
    _watch_run(run, cache.stamp(run))


@st.fragment(run_every=WATCH_SECONDS)
def _watch_run(run: str, stamp: float) -> None:
    """Rerun the whole page once the run's manifest changes (a new snapshot, or the finished run)."""
    if cache.stamp(run) != stamp:
        st.rerun(scope="app")


def restore_widgets(page: str, defaults: dict | None = None) -> None:
    """Put back this page's widget values saved by ``save_widgets`` (Streamlit drops them while another page
    shows), else set ``defaults``. Widgets restored this way must not pass a default of their own."""
    saved = st.session_state.get(f"saved_{page}", {})
    for key, value in {**(defaults or {}), **saved}.items():
        if key not in st.session_state:
            st.session_state[key] = value


def save_widgets(page: str, keys) -> None:
    """Remember the values of this page's value widgets (not buttons or tables) under ``keys``."""
    st.session_state[f"saved_{page}"] = {k: st.session_state[k] for k in keys if k in st.session_state}


def run_store(run_dir: str) -> RunStore:
    """The run's store, or a message saying why it cannot be opened."""
    try:
        return cache.store(run_dir)
    except Exception as err:
        fail(f"Could not open the run {render.code(run_dir)}: {render.md(err)}")


def manifest(run_dir: str) -> dict:
    try:
        return cache.manifest(run_dir)
    except Exception as err:
        fail(f"Could not read the manifest of {render.code(run_dir)}: {render.md(err)}")


def model_source(man: dict) -> tuple[str, str]:
    """Where the run's model comes from (its recorded local path, else its name) and the dtype live pages run it
    in: ``auto`` (the fastest on this machine, which need not be the one that computed the run) unless
    ``SAESCOPE_DTYPE`` says otherwise."""
    from engine.run import loaded

    try:
        return loaded.model_source(man), cache.dtype()
    except ValueError as err:
        fail(f"Live pages cannot load the run's model: {err}.")


def sae_source(man: dict) -> str:
    from engine.run import loaded

    try:
        return loaded.sae_source(man)
    except ValueError as err:
        fail(f"Live pages cannot load the run's SAE: {err}.")


def live(run_dir: str):
    """The run's model and SAE, loaded once per server and checked (once) against the fingerprints the run recorded,
    or a message saying why they cannot be."""
    man = manifest(run_dir)
    source, dtype = model_source(man)
    try:
        lm = cache.model(source, dtype, cache.device())
    except Exception as err:
        fail(f"Could not load the model {render.code(source)}: {render.md(err)}")
    try:
        sae = cache.sae(sae_source(man), str(lm.device))
    except Exception as err:
        fail(f"Could not load the SAE {render.code(sae_source(man))}: {render.md(err)}")
    info = sections(man)
    mismatch = cache.fingerprint_mismatch(source, dtype, cache.device(), sae_source(man), info.model.hash,
                                          info.sae.hash, "this run")
    if mismatch is not None:
        fail(f"Live pages are off for this run: {render.md(mismatch)}")
    return lm, sae


def logit_effects(run_dir: str, feature_id: int) -> tuple[list, list, list, list] | str:
    """A latent's logit effects computed with the run's model and SAE (cached), for runs that left them out of
    features.parquet; or why they cannot be (no model at hand, fingerprints that differ)."""
    from engine.run import loaded

    man = manifest(run_dir)
    try:
        source, sae_path = loaded.model_source(man), loaded.sae_source(man)
        info = sections(man)
        mismatch = cache.fingerprint_mismatch(source, cache.dtype(), cache.device(), sae_path, info.model.hash,
                                              info.sae.hash, "this run")
        if mismatch is not None:
            return mismatch
        n = int((man.get("settings") or {}).get("n_logits") or 10)
        return cache.logit_effects((source, cache.dtype()), sae_path, feature_id, n)
    except Exception as err:  # the page still shows everything else
        return f"{type(err).__name__}: {err}"


def neighbors(run_dir: str, feature_id: int) -> tuple[list, list] | str:
    """A latent's nearest latents found exactly with the run's SAE (cached), for runs that left them out of
    features.parquet; or why they cannot be (the SAE not at hand, or not the run's)."""
    from engine.run import loaded

    man = manifest(run_dir)
    try:
        sae_path = loaded.sae_source(man)
        mismatch = cache.sae_mismatch(sae_path, cache.device(), sections(man).sae.hash, "this run")
        if mismatch is not None:
            return mismatch
        n = int((man.get("neighbors") or {}).get("n") or 10)
        return cache.neighbors(sae_path, feature_id, n)
    except Exception as err:  # the page still shows everything else
        return f"{type(err).__name__}: {err}"


def feature_link(feature_id: int, label: str = "", *, suffix: str = "") -> None:
    """A link to a latent's feature page."""
    text = f"#{feature_id}" + (f" · {render.md(label)}" if label else "") + suffix
    st.page_link(FEATURES_PAGE, label=text, query_params={"feature": str(feature_id)}, icon=":material/open_in_new:")


def search(store: RunStore, text: str, *, by: str | None = None, limit: int = 50) -> list[FeatureSummary]:
    """Latents matching ``text``: by ``by``, or (``None``) by id for a number, else by label, then by token."""
    if by is not None:
        return store.search(text, by=by, limit=limit)
    if text.strip().lstrip("#").isdigit():
        return store.search(text, by="id", limit=limit)
    return store.search(text, by="label", limit=limit) or store.search(text, by="token", limit=limit)


def query_int(key: str) -> int | None:
    """An integer query parameter, or ``None`` when absent or not an integer."""
    value = st.query_params.get(key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
