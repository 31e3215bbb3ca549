"""Query layer over one run directory: DuckDB tables built from the run's Parquet files, opened read-only.

``RunStore.open(run_dir)`` connects to ``index.duckdb`` (built by precompute; rebuilt here if missing)
read-only with external access disabled, so no statement can touch other files. Every method runs
named statements from ``engine.run.sql`` with bound parameters on a fresh cursor, so one store can be
shared by threads (e.g. Streamlit sessions). Results are plain Python: dicts, lists, floats, ints,
strings; ``densities()`` is a numpy array and ``linear_map()`` returns torch tensors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from . import schema, sql
from .index import READ_ONLY, build_index, index_current
from .rundir import data_dir, read_manifest

SEARCH_MODES = ("label", "token", "id")


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    # fixed-size ARRAY columns come back as tuples: hand out lists like the Parquet files' list columns
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in zip(names, row)} for row in cursor.fetchall()]


class RunStore:
    """Read-only queries over one precomputed run. Create with ``RunStore.open(run_dir)``."""

    def __init__(self, run_dir: Path, manifest: dict, con: duckdb.DuckDBPyConnection):
        self.run_dir = run_dir
        self.data_dir = data_dir(run_dir, manifest)
        """Where the files of the run or snapshot this store reads live (``run_dir`` for a finished run)."""
        self._manifest = manifest
        self._con = con
        self._vocab: list[str] = [row[0] for row in con.cursor().execute(sql.VOCAB).fetchall()]

    @classmethod
    def open(cls, run_dir: str | Path, attempts: int = 5) -> RunStore:
        """Open a complete run or snapshot (one with ``manifest.json``); builds the DuckDB index if it is missing.

        A run still being computed may publish a newer snapshot and remove an old one between reading the
        manifest and opening its files: the open then starts over from the new manifest.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        for attempt in range(attempts):
            manifest = read_manifest(run_dir)
            if manifest is None:
                raise ValueError(
                    f"{run_dir} holds no complete saescope run (no {schema.MANIFEST}); "
                    "run `saescope precompute` into it, or wait for its first snapshot"
                )
            try:
                return cls._open_files(run_dir, manifest)
            except (duckdb.IOException, FileNotFoundError):
                if attempt == attempts - 1 or read_manifest(run_dir) == manifest:
                    raise
        raise AssertionError("not reached")

    @classmethod
    def _open_files(cls, run_dir: Path, manifest: dict) -> RunStore:
        files = data_dir(run_dir, manifest)  # a snapshot's folder while the run is still being computed
        # held open from here: a snapshot folder removed later stays readable through this handle
        dark = (files / schema.DARK_MATTER).open("rb")
        try:
            index = files / schema.INDEX
            if not index_current(index):  # missing, or built by an older saescope: rebuild from the Parquet files
                if not (files / schema.FEATURES).is_file():
                    raise FileNotFoundError(f"{files} lacks {schema.FEATURES}")
                if os.access(files, os.W_OK):
                    build_index(files)
                else:  # read-only run directory: keep the index next to the temp files
                    index = Path(tempfile.mkdtemp(prefix="saescope-index-")) / schema.INDEX
                    build_index(files, index)
            store = cls(run_dir, manifest, duckdb.connect(str(index), read_only=True, config=READ_ONLY))
        except BaseException:
            dark.close()
            raise
        store._dark = dark
        return store

    def close(self) -> None:
        self._con.close()
        self._dark.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _query(self, statement: str, params: dict | None = None) -> list[dict[str, Any]]:
        return _rows(self._con.cursor().execute(statement, params or {}))

    # --- run-level ---------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The run's manifest (model, SAE, corpus, settings, metrics, timings)."""
        return self._manifest

    def is_final(self) -> bool:
        """False while this is a snapshot of a run still being computed (see ``snapshot()``)."""
        return bool((self._manifest.get("snapshot") or {}).get("final", True))

    def snapshot(self) -> dict:
        """``final``, ``index``, ``n_tokens`` (covered), ``target_tokens`` (None: the whole corpus), ``host``,
        ``pid``, ``updated`` for a snapshot; ``{"final": True, ...}`` for a finished run."""
        snap = dict(self._manifest.get("snapshot") or {"final": True})
        snap.setdefault("n_tokens", (self._manifest.get("corpus") or {}).get("n_tokens"))
        return snap

    def metrics(self) -> dict:
        """Aggregate reconstruction and CE metrics (``l0``, ``explained_variance``, ``ce_loss_recovered`` ...)."""
        return dict(self._manifest.get("metrics", {}))

    def dark_matter(self) -> dict:
        """Summary of the linear map from x to the SAE error (held-out R^2 of error and error norm ...)."""
        return dict(self._manifest.get("dark_matter", {}))

    def n_features(self) -> int:
        return int(self._con.cursor().execute(sql.N_FEATURES).fetchone()[0])

    def densities(self) -> np.ndarray:
        """Density of every latent, by feature id (float64)."""
        return self._con.cursor().execute(sql.DENSITIES).fetchnumpy()["density"]

    def dead_ids(self) -> list[int]:
        """Latents that never fired on the statistics' tokens."""
        return [row[0] for row in self._con.cursor().execute(sql.DEAD_IDS).fetchall()]

    def linear_map(self):
        """``(W [d_in, d_in], b [d_in])`` float32 tensors: predicted error ``x @ W + b``."""
        from safetensors.torch import load

        self._dark.seek(0)
        tensors = load(self._dark.read())
        return tensors["W"], tensors["b"]

    # --- tokens ----------------------------------------------------------------------------------
    def decode(self, token_ids) -> list[str]:
        """Display string of each token id (``<id N>`` for ids outside the vocabulary)."""
        vocab = self._vocab
        return [vocab[i] if 0 <= i < len(vocab) else f"<id {i}>" for i in (int(t) for t in token_ids)]

    def context(self, context_id: int) -> dict | None:
        """One context's token ids and display strings."""
        rows = self._query(sql.CONTEXT, {"context_id": int(context_id)})
        if not rows:
            return None
        ids = rows[0]["token_ids"]
        return {"context_id": int(context_id), "token_ids": ids, "tokens": self.decode(ids)}

    # --- features ----------------------------------------------------------------------------------
    def feature(self, feature_id: int) -> dict | None:
        """Every features.parquet column of one latent plus ``examples`` (see ``examples``); None if absent."""
        rows = self._query(sql.FEATURE, {"feature_id": int(feature_id)})
        if not rows:
            return None
        out = rows[0]
        out["examples"] = self.examples(feature_id)
        return out

    def examples(self, feature_id: int, kind: str | None = None) -> list[dict]:
        """Top then quantile examples of a latent: kind, rank, quantile_bin, context_id, max_pos, max_act,
        start, acts, token_ids (of the window ``acts`` covers) and tokens (display strings)."""
        if kind not in (None, "top", "quantile"):
            raise ValueError(f"kind must be 'top', 'quantile' or None, got {kind!r}")
        rows = self._query(sql.EXAMPLES, {"feature_id": int(feature_id), "kind": kind})
        wanted = sorted({row["context_id"] for row in rows})
        contexts = dict(self._con.cursor().execute(sql.CONTEXTS, {"context_ids": wanted}).fetchall()) if wanted else {}
        contexts = {k: list(v) for k, v in contexts.items()}
        for row in rows:
            start = row["start"]
            ids = contexts[row["context_id"]][start : start + len(row["acts"])]
            row["token_ids"] = ids
            row["tokens"] = self.decode(ids)
        return rows

    def top_features(
        self,
        sort_by: str = "density",
        descending: bool = True,
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict]:
        """Latent summaries (``sql.SUMMARY_COLUMNS``) sorted by a key, with density filters."""
        if sort_by not in sql.SORT_KEYS:
            raise ValueError(f"sort_by must be one of {', '.join(sql.SORT_KEYS)}, got {sort_by!r}")
        params = {
            "include_dead": bool(include_dead),
            "min_density": None if min_density is None else float(min_density),
            "max_density": None if max_density is None else float(max_density),
            "limit": _count(limit, "limit"),
            "offset": _count(offset, "offset"),
        }
        return self._query(sql.TOP_FEATURES[(sort_by, bool(descending))], params)

    def search(self, text: str, by: str = "label", limit: int = 50) -> list[dict]:
        """Latents whose label contains ``text`` (case-insensitive), that fire on or promote a token whose
        display string equals ``text`` (trimmed, case-insensitive; rows say ``fires_on``/``promotes``), or whose
        id is ``text``. The text is data: it is bound, never spliced into SQL, and has no wildcards."""
        if by not in SEARCH_MODES:
            raise ValueError(f"search mode must be one of {', '.join(SEARCH_MODES)}, got {by!r}")
        text = str(text)
        limit = _count(limit, "limit")
        if by == "id":
            try:
                feature_id = int(text.strip().lstrip("#"))
            except ValueError:
                return []
            if not -(2**31) <= feature_id < 2**31:
                return []
            return self._query(sql.FEATURE_SUMMARY, {"feature_id": feature_id})
        if not text.strip():
            return []
        statement = sql.SEARCH_LABEL if by == "label" else sql.SEARCH_TOKEN
        return self._query(statement, {"text": text, "limit": limit})

    # --- reconstruction and dark matter -----------------------------------------------------------
    def token_rows(self, order_by: str = "err_norm", limit: int = 100, descending: bool = True) -> list[dict]:
        """Per-token error rows of the run's token sample (tokens.parquet columns plus ``token``)."""
        if order_by not in sql.TOKEN_ORDER_KEYS:
            raise ValueError(f"order_by must be one of {', '.join(sql.TOKEN_ORDER_KEYS)}, got {order_by!r}")
        rows = self._query(sql.TOKEN_ROWS[(order_by, bool(descending))], {"limit": _count(limit, "limit")})
        for row, text in zip(rows, self.decode(r["token_id"] for r in rows)):
            row["token"] = text
        return rows

    def worst_contexts(self, n: int = 10) -> list[dict]:
        """Sampled contexts with the highest mean error norm: tokens and per-position error norms (None where
        a position is excluded from statistics)."""
        rows = self._query(sql.WORST_CONTEXTS, {"n": _count(n, "n")})
        for row in rows:
            length = len(row["token_ids"])
            for key in ("err_norms", "err_nonlinear_norms"):
                full: list[float | None] = [None] * length
                for pos, value in zip(row["positions"], row[key]):
                    full[pos] = value
                row[key] = full
            row["tokens"] = self.decode(row["token_ids"])
        return rows


def _count(value: int, name: str) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
