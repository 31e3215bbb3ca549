"""The ``st.cache_data`` / ``st.cache_resource`` wrappers of the Graph and Circuits pages: attribution graph files,
transcoders, ``saescope circuit`` output, an attention head's latents. The models, SAEs, runs and the served
folder come from ``dashboard.cache``, whose rules this module follows (nothing here reads ``st.session_state``)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.cache import device, file_mtime, model, run_root, sae

GRAPHS = "graphs"
"""Attribution graph files (``saescope graph --out RUN/graphs/NAME.json``) live in this folder of a run."""


def graph_files(run_dir: str) -> list[str]:
    """Names (stems) of the run's graph JSON files, newest first."""
    folder = Path(run_dir) / GRAPHS
    if not folder.is_dir():
        return []
    from engine.graph.supernodes import is_graph_file

    files = [p for p in folder.glob("*.json") if is_graph_file(p)]
    return [p.stem for p in sorted(files, key=file_mtime, reverse=True)]


@st.cache_data(show_spinner=False, max_entries=16)
def _graph(path: str, file_stamp: float) -> tuple[dict, list]:
    from engine.graph.files import read_graph
    from engine.graph.layout import place

    document = read_graph(path)
    return document, place(document)


def graph(run_dir: str, name: str) -> tuple[dict, list]:
    """A graph file of the run by name (its JSON and its placed nodes), reread when it changes."""
    path = Path(run_dir) / GRAPHS / f"{name}.json"
    return _graph(str(path), file_mtime(path))


def graph_path(run_dir: str, name: str) -> Path:
    return Path(run_dir) / GRAPHS / f"{name}.json"


@st.cache_data(show_spinner=False, max_entries=16)
def _graph_extras(path: str, groups_stamp: float, file_stamp: float) -> tuple[list, dict[str, float]]:
    from engine.graph.files import node_influences
    from engine.graph.supernodes import load_groups

    return load_groups(path), node_influences(path)


def graph_extras(run_dir: str, name: str) -> tuple[list, dict[str, float]]:
    """A graph's saved supernodes and each node's influence (from its nodes table), reread when they change."""
    from engine.graph.supernodes import groups_path

    path = graph_path(run_dir, name)
    return _graph_extras(str(path), file_mtime(groups_path(path)), file_mtime(path))


@st.cache_data(show_spinner=False, max_entries=16)
def _collapsed(path: str, groups_stamp: float, file_stamp: float) -> tuple[dict, list]:
    from engine.graph.files import read_graph
    from engine.graph.layout import place
    from engine.graph.supernodes import collapse

    groups, influence = _graph_extras(path, groups_stamp, file_stamp)
    shown = collapse(read_graph(path), groups, influence)
    return shown, place(shown)


def collapsed_graph(run_dir: str, name: str) -> tuple[dict, list]:
    """The graph with each saved supernode drawn as one node (its JSON and its placed nodes)."""
    from engine.graph.supernodes import groups_path

    path = graph_path(run_dir, name)
    return _collapsed(str(path), file_mtime(groups_path(path)), file_mtime(path))


@st.cache_resource(show_spinner="Loading the transcoders…", max_entries=2)
def transcoders(folder: str):
    """A folder's transcoders (layer -> Transcoder, float32 on the CPU), shared by every session."""
    from engine.saes.transcoders import load_transcoders

    return load_transcoders(folder)


# --- circuits (engine.circuits) -----------------------------------------------------------------------------
def circuit_root() -> Path | None:
    """Where the Circuits page looks for ``saescope circuit`` output: ``circuits/`` inside the served folder."""
    root = run_root()
    return None if root is None else root / "circuits"


@st.cache_data(show_spinner=False, max_entries=16)
def _circuit(folder: str, file_stamp: float):
    from engine.circuits.files import read_circuit

    info, tables = read_circuit(folder)
    return info, {name: table.to_pandas() for name, table in tables.items()}


def circuit(folder: str):
    """A circuit folder's ``metrics.json`` and its tables as DataFrames (``prompts``, ``codes``, ``heads``, ``pairs``)."""
    from engine.circuits.files import METRICS

    return _circuit(folder, file_mtime(Path(folder) / METRICS))


@st.cache_data(show_spinner=False, max_entries=16)
def _supervised(folder: str, hook: str, file_stamp: float):
    from engine.circuits.supervised_files import read_supervised

    found = read_supervised(folder, hook)
    return None if found is None else (found[0], found[1].to_pandas(), found[2].to_pandas())


def supervised(folder: Path, hook: str):
    """``saescope circuit --supervised``'s evaluation at ``hook`` under ``folder`` (the circuits folder):
    ``supervised.json`` and the control and F1 tables as DataFrames, or None."""
    from engine.circuits.supervised_files import SUMMARY, hook_dir

    return _supervised(str(folder), hook, file_mtime(hook_dir(folder, hook) / SUMMARY))


@st.cache_data(show_spinner="Splitting the attention SAE's latents over the head (one forward per prompt length)…",
               max_entries=64)
def head_latents(model_key: tuple[str, str], sae_path: str, positive: tuple[tuple[int, ...], ...],
                 negative: tuple[tuple[int, ...], ...], head: int):
    """``engine.circuits.head_latents.head_latents`` on a run's model and attention SAE."""
    from engine.circuits.head_latents import head_latents as compute

    lm = model(*model_key, device())
    return compute(lm, sae(sae_path, str(lm.device)), positive, negative, head)
