"""Query layer over one run directory: DuckDB tables built from the run's Parquet files, opened read-only.

``RunStore.open(run_dir)`` connects to ``index.duckdb`` (built by precompute; rebuilt here if missing)
read-only with external access disabled, so no statement can touch other files, and with its memory capped
(``MEMORY_LIMIT``). Every method runs
named statements from ``engine.run.sql`` with bound parameters on a fresh cursor, so one store can be
shared by threads (e.g. Streamlit sessions). Rows come back as the immutable row types of
``engine.run.rows`` (attribute access, built straight from DuckDB's result tuples); ``manifest()`` is the
manifest's dict, ``densities()`` a numpy array and ``linear_map()`` returns torch tensors.
"""

from __future__ import annotations

import operator
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import settings
from . import schema, sql
from .index import build_index, cursor, index_current, open_read_only
from .rows import (
    Context,
    ContextErrors,
    DarkMatterSummary,
    Example,
    ExampleDFA,
    FeatureRow,
    FeatureSummary,
    RunMetrics,
    RunSnapshot,
    TokenRow,
)
from .rundir import data_dir, read_manifest

SEARCH_MODES = ("label", "token", "id")
MEMORY_LIMIT_ENV = settings.DUCKDB_MEMORY_LIMIT.name
MEMORY_LIMIT = "1GB"
"""DuckDB's memory cap per open run (``$SAESCOPE_DUCKDB_MEMORY_LIMIT`` overrides it; -1: none). DuckDB's own default
is 80% of the machine's memory per connection, and an app may hold several runs open; the store's queries are point
lookups, top-N and pre-sorted scans, which need far less."""

# Columns each query returns, in the order of the row type's leading fields (checked by name at fetch time).
_FEATURE_COLUMNS = FeatureRow._fields[:-1]  # every features.parquet column; examples are added
_SUMMARY_COLUMNS = FeatureSummary._fields[: len(sql.SUMMARY_COLUMNS)]
_SEARCH_TOKEN_COLUMNS = FeatureSummary._fields  # the summary plus fires_on, promotes
_EXAMPLE_COLUMNS = Example._fields[: Example._fields.index("acts") + 1]  # token_ids and tokens are added
_TOKEN_COLUMNS = TokenRow._fields[:-1]  # every tokens.parquet column; token is added
_WORST_COLUMNS = ("context_id", "mean_err_norm", "max_err_norm", "positions", "err_norms", "err_nonlinear_norms", "token_ids")
# List columns a fixed-size ARRAY in the index may hold: DuckDB returns those as tuples, the rows hand out lists.
_FEATURE_LISTS = tuple(
    i for i, name in enumerate(_FEATURE_COLUMNS) if pa.types.is_list(schema.FEATURES_SCHEMA.field(name).type)
)


def _select(cursor: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """The result's rows as tuples of ``columns`` in that order (as DuckDB returns them when the query's columns
    are exactly these; picked by name otherwise, e.g. from a table with its columns in another order)."""
    names = tuple(d[0] for d in cursor.description)
    rows = cursor.fetchall()
    if names == tuple(columns):
        return rows
    missing = [c for c in columns if c not in names]
    if missing:
        raise RuntimeError(f"query returned columns {names}, lacking {missing}: the run's index does not match this saescope")
    pick = operator.itemgetter(*(names.index(c) for c in columns))
    return [pick(row) for row in rows]


def _as_list(value: Any) -> Any:
    """A list column's value as a list (a fixed-size ARRAY comes back as a tuple); None stays None."""
    return None if value is None else list(value)


def memory_limit() -> str:
    """The memory cap for a run's connection: ``$SAESCOPE_DUCKDB_MEMORY_LIMIT`` if set (checked), else ``MEMORY_LIMIT``."""
    value = settings.get(settings.DUCKDB_MEMORY_LIMIT, "").strip()
    if not value:
        return MEMORY_LIMIT
    try:
        duckdb.connect(config={"memory_limit": value}).close()
    except duckdb.Error as err:
        raise ValueError(f"${MEMORY_LIMIT_ENV}={value!r} is not a memory size DuckDB reads (e.g. 1GB, 512MB): {err}") from err
    return value


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def feature_densities(run_dir: str | Path) -> np.ndarray | None:
    """Every latent's firing density, by id, read from the run's features file alone (no index needed: search
    builds its own index beside it); None when the run has no features file."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if (run_dir / schema.MANIFEST).is_file() else None
    path = (data_dir(run_dir, manifest) if manifest is not None else run_dir) / schema.FEATURES
    if not path.is_file():
        return None
    table = pq.read_table(path, columns=["feature_id", "density"])
    ids = table["feature_id"].to_numpy()
    out = np.full(int(ids.max()) + 1 if len(ids) else 0, np.nan)
    out[ids] = table["density"].to_numpy(zero_copy_only=False).astype(np.float64)
    return out


class RunStore:
    """Read-only queries over one precomputed run. Create with ``RunStore.open(run_dir)``."""

    def __init__(self, run_dir: Path, manifest: dict[str, Any], con: duckdb.DuckDBPyConnection, dark: BinaryIO):
        self.run_dir = run_dir
        self.data_dir = data_dir(run_dir, manifest)
        """Where the files of the run or snapshot this store reads live (``run_dir`` for a finished run)."""
        self._manifest = manifest
        self._con = con
        self._dark = dark  # dark_matter.safetensors, held open (see ``_open_files``)
        self._vocab: list[str] = [row[0] for row in cursor(con).execute(sql.VOCAB).fetchall()]

    @classmethod
    def open(cls, run_dir: str | Path, attempts: int = 5, memory_limit: str | None = None) -> RunStore:
        """Open a complete run or snapshot (one with ``manifest.json``); builds the DuckDB index if it is missing.
        ``memory_limit`` caps DuckDB's memory (default: the module's ``memory_limit()``).

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
                return cls._open_files(run_dir, manifest, memory_limit)
            except (duckdb.IOException, FileNotFoundError):
                if attempt == attempts - 1 or read_manifest(run_dir) == manifest:
                    raise
        raise AssertionError("not reached")

    @classmethod
    def _open_files(cls, run_dir: Path, manifest: dict[str, Any], limit: str | None = None) -> RunStore:
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
            return cls(run_dir, manifest, open_read_only(index, limit or memory_limit()), dark)
        except BaseException:
            dark.close()
            raise

    def close(self) -> None:
        self._con.close()
        self._dark.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _execute(self, statement: str, params: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
        return cursor(self._con).execute(statement, params or {})

    def _scalar(self, statement: str) -> Any:
        row = self._execute(statement).fetchone()
        if row is None:
            raise RuntimeError(f"no row from {statement!r}")
        return row[0]

    # --- run-level ---------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The run's manifest (model, SAE, corpus, settings, metrics, timings): the parsed ``manifest.json``."""
        return self._manifest

    def is_final(self) -> bool:
        """False while this is a snapshot of a run still being computed (see ``snapshot()``)."""
        return bool(_section(self._manifest, "snapshot").get("final", True))

    def snapshot(self) -> RunSnapshot:
        """Where the run stands (``final``, ``index``, ``n_tokens``, ``seen_tokens``, ``target_tokens``, ``host``,
        ``pid``); a run without a ``snapshot`` section is final, with the corpus' ``n_tokens``."""
        snap = _section(self._manifest, "snapshot")
        n_tokens = snap["n_tokens"] if "n_tokens" in snap else _section(self._manifest, "corpus").get("n_tokens")
        return RunSnapshot(
            final=bool(snap.get("final", True)), index=snap.get("index"), n_tokens=n_tokens,
            seen_tokens=snap.get("seen_tokens"), target_tokens=snap.get("target_tokens"), host=snap.get("host"),
            pid=snap.get("pid"),
        )

    def metrics(self) -> RunMetrics:
        """Aggregate reconstruction and CE metrics (``l0``, ``explained_variance``, ``ce_loss_recovered`` ...)."""
        section = _section(self._manifest, "metrics")
        return RunMetrics(*(section.get(name) for name in RunMetrics._fields))

    def dark_matter(self) -> DarkMatterSummary | None:
        """Summary of the linear map from x to the SAE error (held-out R^2 of error and error norm ...); None when
        the manifest has no dark-matter section."""
        section = _section(self._manifest, "dark_matter")
        return DarkMatterSummary(*(section.get(name) for name in DarkMatterSummary._fields)) if section else None

    def n_features(self) -> int:
        return int(self._scalar(sql.N_FEATURES))

    def densities(self) -> np.ndarray:
        """Density of every latent, by feature id (float64)."""
        return np.asarray(self._execute(sql.DENSITIES).fetchnumpy()["density"], dtype=np.float64)

    def gradient_only_counts(self) -> np.ndarray | None:
        """A g-SAE run's firings of each latent admitted by the gradient alone, by feature id (int64); None for
        other runs (and g-SAE runs written before the count existed)."""
        values = [row[0] for row in self._execute(sql.GRADIENT_ONLY).fetchall()]
        if not values or all(v is None for v in values):
            return None
        return np.array([0 if v is None else v for v in values], dtype=np.int64)

    def dead_ids(self) -> list[int]:
        """Latents that never fired on the statistics' tokens."""
        return [row[0] for row in self._execute(sql.DEAD_IDS).fetchall()]

    def linear_map(self):
        """``(W [d_in, d_in], b [d_in])`` float32 tensors: predicted error ``x @ W + b``."""
        from safetensors.torch import load

        self._dark.seek(0)
        tensors = load(self._dark.read())
        return tensors["W"], tensors["b"]

    # --- tokens ----------------------------------------------------------------------------------
    def decode(self, token_ids: Iterable[int]) -> list[str]:
        """Display string of each token id (``<id N>`` for ids outside the vocabulary)."""
        vocab, n = self._vocab, len(self._vocab)
        return [vocab[i] if 0 <= i < n else f"<id {i}>" for i in map(int, token_ids)]

    @property
    def vocab(self) -> list[str]:
        """Display string of every token id, in id order."""
        return self._vocab

    def contexts(self, context_ids: Iterable[int]) -> dict[int, list[int]]:
        """Token ids of each of ``context_ids`` that the run holds."""
        wanted = sorted({int(c) for c in context_ids})
        if not wanted:
            return {}
        return {int(c): list(t) for c, t in self._execute(sql.CONTEXTS, {"context_ids": wanted}).fetchall()}

    def context_ids(self) -> np.ndarray:
        """Every context id the run holds, ascending."""
        return np.asarray(self._execute(sql.CONTEXT_IDS).fetchnumpy()["context_id"], dtype=np.int64)

    def labels(self, feature_ids: Iterable[int]) -> dict[int, str]:
        """The top-token label of each latent of ``feature_ids`` ("" when it has none)."""
        ids = [int(f) for f in feature_ids]
        return {int(f): lab or "" for f, lab in self._execute(sql.LABELS, {"feature_ids": ids}).fetchall()}

    def density_and_max(self) -> tuple[np.ndarray, np.ndarray]:
        """Every latent's firing density and maximum activation, in feature-id order."""
        got = self._execute(sql.DENSITY_AND_MAX).fetchnumpy()
        return np.asarray(got["density"], np.float64), np.asarray(got["max_act"], np.float64)

    def example_rows(self, feature_ids: Iterable[int]) -> list[tuple[Any, ...]]:
        """``(feature_id, kind, rank, quantile_bin, context_id, max_pos, start, acts)`` of every example of the
        latents ``feature_ids``: per latent its top examples by rank, then its quantile examples (bulk reads for
        explanations; ``examples`` is one latent's, with tokens)."""
        ids = [int(f) for f in feature_ids]
        return [tuple(r) for r in self._execute(sql.EXAMPLES_OF, {"feature_ids": ids}).fetchall()]

    def context(self, context_id: int) -> Context | None:
        """One context's token ids and display strings; None for an unknown id."""
        row = self._execute(sql.CONTEXT, {"context_id": int(context_id)}).fetchone()
        if row is None:
            return None
        ids = list(row[0])
        return Context(int(context_id), ids, self.decode(ids))

    # --- features ----------------------------------------------------------------------------------
    def feature(self, feature_id: int) -> FeatureRow | None:
        """Every features.parquet column of one latent plus its ``examples`` (see ``examples``); None if absent."""
        rows = _select(self._execute(sql.FEATURE, {"feature_id": int(feature_id)}), _FEATURE_COLUMNS)
        if not rows:
            return None
        values = list(rows[0])
        for i in _FEATURE_LISTS:
            values[i] = _as_list(values[i])
        values.append(self.examples(feature_id))
        return FeatureRow._make(values)

    def examples(self, feature_id: int, kind: str | None = None) -> list[Example]:
        """Top then quantile examples of a latent (``kind``: only those), each with the token ids and display
        strings of the window its ``acts`` cover."""
        if kind not in (None, "top", "quantile"):
            raise ValueError(f"kind must be 'top', 'quantile' or None, got {kind!r}")
        rows = _select(self._execute(sql.EXAMPLES, {"feature_id": int(feature_id), "kind": kind}), _EXAMPLE_COLUMNS)
        return self._examples(rows, self._contexts(rows)) if rows else []

    def _contexts(self, rows: Sequence[tuple[Any, ...]]) -> dict[int, Any]:
        wanted = sorted({row[3] for row in rows})  # context_id
        return dict(self._execute(sql.CONTEXTS, {"context_ids": wanted}).fetchall())

    def _examples(self, rows: Iterable[tuple[Any, ...]], contexts: dict[int, Any]) -> list[Example]:
        out = []
        for kind_, rank, quantile_bin, context_id, max_pos, max_act, start, acts in rows:
            ids = list(contexts[context_id][start : start + len(acts)])
            out.append(Example(kind_, rank, quantile_bin, context_id, max_pos, max_act, start, list(acts), ids, self.decode(ids)))
        return out

    def attribution(self, feature_id: int) -> list[ExampleDFA]:
        """Head and source-token attribution of a latent's top examples, by rank (empty for SAEs not on
        ``attn.hook_z`` and for runs written before it)."""
        rows = _select(self._execute(sql.ATTRIBUTION, {"feature_id": int(feature_id)}), ExampleDFA._fields)
        return [
            ExampleDFA(rank, context_id, max_pos, list(heads), list(sources), list(values), rest, bias, list(terms))
            for rank, context_id, max_pos, heads, sources, values, rest, bias, terms in rows
        ]

    def iter_features(self, batch_size: int = 1024) -> Iterator[FeatureRow]:
        """Every latent's ``feature`` row, examples included, in feature-id order: the bulk read of an export, one
        statement of each kind per ``batch_size`` latents instead of three per latent."""
        last = self._scalar(sql.MAX_FEATURE_ID)
        step = _count(batch_size, "batch_size") or 1
        for first in range(0, -1 if last is None else int(last) + 1, step):
            bounds = {"first": first, "stop": first + step}
            features = _select(self._execute(sql.FEATURES_RANGE, bounds), _FEATURE_COLUMNS)
            examples = _select(self._execute(sql.EXAMPLES_RANGE, bounds), ("feature_id", *_EXAMPLE_COLUMNS))
            contexts = self._contexts([row[1:] for row in examples]) if examples else {}
            by_feature: dict[int, list[tuple[Any, ...]]] = {}
            for row in examples:
                by_feature.setdefault(row[0], []).append(row[1:])
            for values in features:
                values = list(values)
                for i in _FEATURE_LISTS:
                    values[i] = _as_list(values[i])
                values.append(self._examples(by_feature.get(values[0], []), contexts))
                yield FeatureRow._make(values)

    def top_features(
        self,
        sort_by: str = "density",
        descending: bool = True,
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = False,
        limit: int = 50,
        offset: int = 0,
        latents: range | None = None,
    ) -> list[FeatureSummary]:
        """Latent summaries sorted by a key, with density filters; ``latents`` keeps ids in that range (a
        Matryoshka group)."""
        if sort_by not in sql.SORT_KEYS:
            raise ValueError(f"sort_by must be one of {', '.join(sql.SORT_KEYS)}, got {sort_by!r}")
        params = {
            "include_dead": bool(include_dead),
            "min_density": None if min_density is None else float(min_density),
            "max_density": None if max_density is None else float(max_density),
            "limit": _count(limit, "limit"),
            "offset": _count(offset, "offset"),
            "min_id": None if latents is None else _count(latents.start, "latents.start"),
            "stop_id": None if latents is None else _count(latents.stop, "latents.stop"),
        }
        return self._summaries(sql.TOP_FEATURES[(sort_by, bool(descending))], params)

    def search(self, text: str, by: str = "label", limit: int = 50) -> list[FeatureSummary]:
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
            return self._summaries(sql.FEATURE_SUMMARY, {"feature_id": feature_id})
        if not text.strip():
            return []
        if by == "label":
            return self._summaries(sql.SEARCH_LABEL, {"text": text, "limit": limit})
        return self._summaries(sql.SEARCH_TOKEN, {"text": text, "limit": limit}, _SEARCH_TOKEN_COLUMNS)

    def _summaries(
        self, statement: str, params: dict[str, Any], columns: Sequence[str] = _SUMMARY_COLUMNS
    ) -> list[FeatureSummary]:
        return [FeatureSummary(*row) for row in _select(self._execute(statement, params), columns)]

    # --- reconstruction and dark matter -----------------------------------------------------------
    def l0_sample(self) -> np.ndarray:
        """Latents active on each token of the run's token sample (tokens.parquet), int64."""
        return np.asarray(self._execute(sql.TOKEN_L0).fetchnumpy()["l0"], dtype=np.int64)

    def token_rows(self, order_by: str = "err_norm", limit: int = 100, descending: bool = True) -> list[TokenRow]:
        """Per-token error rows of the run's token sample (tokens.parquet columns plus ``token``)."""
        if order_by not in sql.TOKEN_ORDER_KEYS:
            raise ValueError(f"order_by must be one of {', '.join(sql.TOKEN_ORDER_KEYS)}, got {order_by!r}")
        statement = sql.TOKEN_ROWS[(order_by, bool(descending))]
        rows = _select(self._execute(statement, {"limit": _count(limit, "limit")}), _TOKEN_COLUMNS)
        texts = self.decode(row[2] for row in rows)  # token_id
        return [TokenRow._make((*row, text)) for row, text in zip(rows, texts, strict=True)]

    def worst_contexts(self, n: int = 10) -> list[ContextErrors]:
        """Sampled contexts with the highest mean error norm: tokens and per-position error norms (None where
        a position is excluded from statistics)."""
        rows = _select(self._execute(sql.WORST_CONTEXTS, {"n": _count(n, "n")}), _WORST_COLUMNS)
        out = []
        for context_id, mean_err, max_err, positions, err_norms, nonlinear_norms, token_ids in rows:
            ids = list(token_ids)
            errs, nonlinear = _spread(positions, err_norms, len(ids)), _spread(positions, nonlinear_norms, len(ids))
            out.append(ContextErrors(context_id, mean_err, max_err, list(positions), errs, nonlinear, ids, self.decode(ids)))
        return out


def _spread(positions: Sequence[int], values: Sequence[float], length: int) -> list[float | None]:
    """``values`` placed at ``positions`` of a list of ``length`` (None elsewhere)."""
    full: list[float | None] = [None] * length
    for pos, value in zip(positions, values, strict=True):
        full[pos] = value
    return full


def _count(value: int, name: str) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
