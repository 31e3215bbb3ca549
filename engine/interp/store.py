"""Query layer over a run's explanations and scores (docs/explanations.md): ``InterpStore.open(run_dir)``.

The run's ``explanations.parquet``, ``scores.parquet`` and the keys of ``explanation_embeddings.parquet``, plus any
batches ``saescope explain`` has not folded in yet (``.interp/parts/``), are loaded into a small DuckDB file
``interp.duckdb`` next to them (built aside and renamed into place; in a temp folder when the run directory is
not writable). It records a signature (name, size, mtime) of every source file and is rebuilt when any changes,
so a resumed or finished ``explain`` shows up at the next open. The store opens it read-only with external access
disabled and runs every statement with bound parameters on a fresh cursor: one store can serve many threads.
A run without explanations opens too and simply has none.

Which explanation is *best* for a latent: among its non-baseline explanations with status ``ok``, the highest
mean of its available scores (explanations without any score come last), ties by the newest ``created_at``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from ..run.index import building, cursor, open_read_only
from . import storage

INTERP_DB = "interp.duckdb"
DB_VERSION = 2
"""Bumped whenever interp.duckdb's tables change; an older file is rebuilt."""
BASELINE_PREFIX = "baseline:"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --- building (a writable connection reading the Parquet files; file lists are bound parameters) ------------------
_ORD = "list_position($files, filename) * 1099511627776 + file_row_number"
"""Write order of a row: its file's place in ``$files`` (the consolidated file, then the parts in order), then its row."""
_READ = "read_parquet({files}, filename = true, file_row_number = true, union_by_name = true)"
LOAD_ONE = "CREATE TABLE {table} AS SELECT {columns} FROM read_parquet($files, union_by_name = true)"
"""One file (the consolidated one, written deduplicated and sorted by key): loaded as it is, in its order."""
LOAD_SUPERSEDED = f"""
CREATE TEMP TABLE superseded AS SELECT _ord FROM (
    SELECT {_ORD} AS _ord, row_number() OVER (PARTITION BY {{keys}} ORDER BY {_ORD} DESC) AS newer
    FROM {_READ.format(files="$files")}
) WHERE newer > 1
"""
"""Rows a later part rewrote (same key): found from the key columns alone, so the large ``details`` never move."""
LOAD_MANY = f"""
CREATE TABLE {{table}} AS
SELECT {{columns}} FROM {_READ.format(files="$first")} WHERE {_ORD} NOT IN (SELECT _ord FROM superseded)
UNION ALL (
    SELECT {{columns}} FROM {_READ.format(files="$rest")} WHERE {_ORD} NOT IN (SELECT _ord FROM superseded)
    ORDER BY feature_id
)
"""
"""The first file in its order, then the parts' rows sorted by latent: the table stays clustered by feature_id
(what point lookups need) without sorting the consolidated rows again."""
LOAD_EMPTY = "CREATE TABLE {table} AS SELECT {columns} FROM empty_source"
DROP_SUPERSEDED = "DROP TABLE superseded"

BUILD_EXPLANATIONS = """
CREATE TABLE explanations AS
WITH agg AS (
    SELECT feature_id, explainer, prompt_version,
           list({'scorer': scorer, 'score': score, 'n': n_examples}) AS scored, avg(score) AS mean_score
    FROM scores GROUP BY feature_id, explainer, prompt_version
), ranked AS (
    SELECT e.feature_id, e.explainer, e.prompt_version, e.explanation, e.status, e.reason,
           epoch_us(e.created_at) AS created_us,
           a.scored, a.mean_score,
           starts_with(e.explainer, $baseline) AS baseline,
           (e.status = 'ok' AND e.explanation IS NOT NULL) AS usable,
           row_number() OVER (PARTITION BY e.feature_id
               ORDER BY (e.status = 'ok' AND e.explanation IS NOT NULL) DESC, a.mean_score DESC NULLS LAST,
                        e.created_at DESC NULLS LAST, e.explainer, e.prompt_version) AS rank
    FROM raw_explanations e LEFT JOIN agg a USING (feature_id, explainer, prompt_version)
)
SELECT *, (usable AND NOT baseline AND rank = min(CASE WHEN usable AND NOT baseline THEN rank END)
           OVER (PARTITION BY feature_id)) AS is_best
FROM ranked ORDER BY feature_id, rank
"""
BUILD_INFO = "CREATE TABLE interp_info AS SELECT $version::INTEGER AS version, $signature::VARCHAR AS signature"
DROP_RAW = "DROP TABLE raw_explanations"

# --- reading (read-only connection) -------------------------------------------------------------------------------
INFO = "SELECT max(version), max(signature) FROM interp_info"
_EXPLANATION_COLUMNS = "feature_id, explainer, prompt_version, explanation, status, reason, created_us, scored, mean_score, rank"
EXPLANATIONS_OF = f"SELECT {_EXPLANATION_COLUMNS} FROM explanations WHERE feature_id = $feature_id"
"""Sorted in Python: an ORDER BY costs more than the lookup itself (about 0.7 of 1.4 ms)."""
BEST_OF = (f"SELECT {_EXPLANATION_COLUMNS} FROM explanations "
           "WHERE is_best AND feature_id IN (SELECT unnest($ids))")
BEST_ALL = f"SELECT {_EXPLANATION_COLUMNS} FROM explanations WHERE is_best ORDER BY feature_id"
TEXTS_OF = ("SELECT feature_id, explainer, prompt_version, explanation FROM explanations "
            "WHERE feature_id IN (SELECT unnest($ids))")
SCORES_OF = """
SELECT feature_id, explainer, prompt_version, scorer, score, n_examples, details FROM scores
WHERE feature_id = $feature_id AND explainer = $explainer AND ($prompt_version IS NULL OR prompt_version = $prompt_version)
"""
SUMMARY_EXPLANATIONS = """
SELECT explainer, prompt_version, count(*) AS n, count(*) FILTER (WHERE status = 'ok') AS n_ok,
       count(*) FILTER (WHERE status = 'failed') AS n_failed, count(*) FILTER (WHERE status = 'skipped') AS n_skipped,
       avg(mean_score) AS mean_score, bool_or(baseline) AS baseline
FROM explanations GROUP BY explainer, prompt_version ORDER BY explainer, prompt_version
"""
SUMMARY_SCORES = """
SELECT explainer, prompt_version, scorer, avg(score) AS mean, count(score) AS n FROM scores
GROUP BY explainer, prompt_version, scorer ORDER BY explainer, prompt_version, scorer
"""
COUNTS = """
SELECT (SELECT count(*) FROM explanations), (SELECT count(DISTINCT feature_id) FROM explanations WHERE usable),
       (SELECT count(*) FROM explanations WHERE is_best), (SELECT count(*) FROM scores)
"""
MODELS = "SELECT model, count(*) AS n FROM embedded GROUP BY model ORDER BY n DESC, model"
EMBEDDED_BEST = """
SELECT e.feature_id, e.explainer, e.prompt_version, e.mean_score FROM explanations e
SEMI JOIN embedded m ON m.model = $model AND m.feature_id = e.feature_id AND m.explainer = e.explainer
                        AND m.prompt_version = e.prompt_version
WHERE e.usable AND NOT e.baseline
QUALIFY row_number() OVER (PARTITION BY e.feature_id ORDER BY e.rank) = 1
ORDER BY e.feature_id
"""


@dataclass(frozen=True)
class Explanation:
    """One explainer's explanation of one latent with its scores (``None``: the scorer's score is undefined)."""

    feature_id: int
    explainer: str
    prompt_version: str
    text: str | None
    """None when the explainer failed or the latent had no examples (see ``status``, ``reason``)."""
    status: str
    """``ok``, ``failed`` or ``skipped``."""
    reason: str
    created_at: datetime | None
    scores: dict[str, float | None] = field(default_factory=dict)
    """Score per scorer (detection, fuzzing, embedding) that ran."""
    n_examples: dict[str, int] = field(default_factory=dict)
    mean_score: float | None = None
    """Mean of the defined scores (what ``best`` ranks by)."""
    rank: int = 1
    """1 for the best-ranked explanation of this latent, baselines included."""

    @property
    def is_baseline(self) -> bool:
        return self.explainer.startswith(BASELINE_PREFIX)


@dataclass(frozen=True)
class ExcerptResult:
    """How a scorer did on one held-out excerpt."""

    context_id: int
    activating: bool
    value: float | None
    """The judge's P(1)/(P(0)+P(1)) (detection, fuzzing) or cosine(explanation, excerpt) (embedding)."""
    predicted: bool | None
    """``value > 0.5`` for detection and fuzzing; None for embedding (a ranking, no threshold)."""
    misordered: int
    """Excerpts of the other class ranked on the wrong side of this one (strictly); AUROC = 1 - pairs / (P * N)."""
    wrong: bool
    """Detection/fuzzing: the prediction differs from the label. Embedding: ``misordered > 0`` (an activating
    excerpt ranked below a non-activating one, or a non-activating one above an activating one)."""
    window: tuple[int, int] | None = None
    """``[start, end)`` of the excerpt in its context (None: scored before windows were recorded)."""


@dataclass(frozen=True)
class ScoreDetail:
    """One scorer's result on one explanation, with its per-excerpt details parsed."""

    feature_id: int
    explainer: str
    prompt_version: str
    scorer: str
    score: float | None
    n_examples: int
    auroc: float | None
    """AUROC of the judge's probabilities (detection, fuzzing) or of the similarities (embedding)."""
    excerpts: tuple[ExcerptResult, ...]

    @property
    def wrong(self) -> tuple[ExcerptResult, ...]:
        return tuple(e for e in self.excerpts if e.wrong)

    @property
    def missed(self) -> tuple[ExcerptResult, ...]:
        """Activating excerpts the scorer got wrong (false negatives, or ranked below a non-activating one)."""
        return tuple(e for e in self.excerpts if e.wrong and e.activating)

    @property
    def false_alarms(self) -> tuple[ExcerptResult, ...]:
        """Non-activating excerpts the scorer got wrong."""
        return tuple(e for e in self.excerpts if e.wrong and not e.activating)


@dataclass(frozen=True)
class ExplainerSummary:
    explainer: str
    prompt_version: str
    n: int
    n_ok: int
    n_failed: int
    n_skipped: int
    mean_scores: dict[str, float | None]
    """Mean score per scorer over the latents where it is defined."""
    n_scored: dict[str, int]
    mean_score: float | None
    """Mean over latents of each explanation's mean score."""
    is_baseline: bool


@dataclass(frozen=True)
class InterpSummary:
    n_explanations: int
    """Rows of explanations (every explainer and prompt version, failed and skipped included)."""
    n_latents: int
    """Latents with at least one usable (``ok``) explanation, baselines included."""
    n_best: int
    """Latents with a usable non-baseline explanation (what ``best`` and search cover)."""
    n_scores: int
    explainers: tuple[ExplainerSummary, ...]
    embedding_models: dict[str, int]


def _file_sig(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def source_signature(run_dir: Path) -> str:
    """Name, size and mtime of every consolidated file and part file: changes whenever explain writes anything."""
    sig: list = []
    for name in storage.FILES:
        if (run_dir / name).is_file():
            sig.append(_file_sig(run_dir / name))
    for part in storage.part_folders(run_dir):
        sig.append([part.name, [_file_sig(part / n) for n in storage.FILES if (part / n).is_file()]])
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32] if sig else ""


def source_files(run_dir: Path, name: str) -> list[Path]:
    """The files holding rows of one kind, in write order: the consolidated file, then the parts."""
    files = [run_dir / name] if (run_dir / name).is_file() else []
    return files + [p / name for p in storage.part_folders(run_dir) if (p / name).is_file()]


def _load(con: duckdb.DuckDBPyConnection, table: str, files: list[Path], name: str, columns: list[str]) -> None:
    """One kind's rows into ``table``: deduplicated by key (the newest row kept), clustered by feature_id."""
    listed = ", ".join(columns)
    paths = [str(p) for p in files]
    if not paths:
        schema = storage.FILES[name]
        con.register("empty_source", pa.schema([schema.field(c) for c in columns]).empty_table())
        con.execute(LOAD_EMPTY.format(table=table, columns=listed))
        con.unregister("empty_source")
    elif len(paths) == 1:
        con.execute(LOAD_ONE.format(table=table, columns=listed), {"files": paths})
    else:
        con.execute(LOAD_SUPERSEDED.format(keys=", ".join(storage.KEYS[name])), {"files": paths})
        con.execute(LOAD_MANY.format(table=table, columns=listed), {"files": paths, "first": paths[:1], "rest": paths[1:]})
        con.execute(DROP_SUPERSEDED)


def build_interp_db(run_dir: str | Path, target: str | Path | None = None) -> Path:
    """Load the run's explanation files and pending parts into ``interp.duckdb`` (default next to them), atomically.
    Raises ``duckdb.IOException`` when a part vanished while being read (explain consolidated it): try again."""
    run_dir = Path(run_dir)
    target = Path(target) if target else run_dir / INTERP_DB
    signature = source_signature(run_dir)
    files = {name: source_files(run_dir, name) for name in storage.FILES}
    with building(target) as con:
        _load(con, "raw_explanations", files[storage.EXPLANATIONS], storage.EXPLANATIONS,
              [f.name for f in storage.EXPLANATIONS_SCHEMA])
        _load(con, "scores", files[storage.SCORES], storage.SCORES, [f.name for f in storage.SCORES_SCHEMA])
        _load(con, "embedded", files[storage.EMBEDDINGS], storage.EMBEDDINGS,
              ["feature_id", "explainer", "prompt_version", "model"])
        con.execute(BUILD_EXPLANATIONS, {"baseline": BASELINE_PREFIX})
        con.execute(DROP_RAW)
        con.execute(BUILD_INFO, {"version": DB_VERSION, "signature": signature})
    return target


def _db_signature(path: Path) -> tuple[int, str] | None:
    if not path.is_file():
        return None
    try:
        with open_read_only(path) as con:
            row = con.execute(INFO).fetchone()
    except duckdb.Error:
        return None
    return (int(row[0]), str(row[1])) if row and row[0] is not None else None


def fallback_dir(run_dir: Path) -> Path:
    """Where derived files of a read-only run directory go: one temp folder per run path (reused across opens)."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"saescope-interp-{digest}"


def _created(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=int(us))


def _explanation(row: tuple) -> Explanation:
    fid, who, version, text, status, reason, created_us, scored, mean, rank = row
    scored = sorted(scored or [], key=lambda s: s["scorer"])
    return Explanation(int(fid), who, version, text, status, reason or "", _created(created_us),
                       {s["scorer"]: s["score"] for s in scored}, {s["scorer"]: int(s["n"] or 0) for s in scored},
                       None if mean is None else float(mean), int(rank))


def _misordered(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per excerpt: how many excerpts of the other class sit strictly on the wrong side of it."""
    pos, neg = values[labels], values[~labels]
    out = np.zeros(len(values), np.int64)
    out[labels] = (values[labels][:, None] < neg[None, :]).sum(1)
    out[~labels] = (values[~labels][:, None] > pos[None, :]).sum(1)
    return out


def parse_details(scorer: str, details: str | dict | None) -> tuple[float | None, tuple[ExcerptResult, ...]]:
    """(auroc, per-excerpt results) from a scores row's ``details`` JSON (see ``engine.interp.scorers``)."""
    d = json.loads(details) if isinstance(details, str) else (details or {})
    ids = d.get("context_ids") or []
    labels = np.array([bool(x) for x in d.get("labels") or []], bool)
    raw = (d.get("similarities") if "similarities" in d else d.get("probabilities")) or []
    if not (len(ids) == len(labels) == len(raw)):
        return d.get("auroc"), ()
    values = np.array([np.nan if v is None else float(v) for v in raw], np.float64)
    windows = d.get("windows") or []
    if len(windows) != len(ids):
        windows = [None] * len(ids)
    finite = np.isfinite(values)
    ranked = np.where(finite, values, -np.inf)
    misordered = _misordered(labels, ranked)
    out = []
    for i, cid in enumerate(ids):
        value = float(values[i]) if finite[i] else None
        if scorer == "embedding":
            predicted, wrong = None, bool(misordered[i] > 0)
        else:
            predicted = bool(value is not None and value > 0.5)
            wrong = predicted != bool(labels[i])
        window = windows[i]
        span = (int(window[0]), int(window[1])) if window and len(window) == 2 and int(window[0]) >= 0 else None
        out.append(ExcerptResult(int(cid), bool(labels[i]), value, predicted, int(misordered[i]), wrong, span))
    auc = d.get("auroc")
    if auc is None and scorer == "embedding" and labels.any() and (~labels).any():
        auc = 1.0 - float(misordered[labels].sum() + 0.5 * _ties(labels, ranked)) / (labels.sum() * (~labels).sum())
    return (None if auc is None else float(auc)), tuple(out)


def _ties(labels: np.ndarray, values: np.ndarray) -> int:
    return int((values[labels][:, None] == values[~labels][None, :]).sum())


class InterpStore:
    """Read-only queries over a run's explanations and scores. Create with ``InterpStore.open(run_dir)``."""

    def __init__(self, run_dir: Path, con: duckdb.DuckDBPyConnection | None, signature: str, db_path: Path | None):
        self.run_dir = run_dir
        self.db_path = db_path
        """The interp.duckdb this store reads (None: the run has no explanation files)."""
        self.signature = signature
        """Signature of the source files the database was built from (``""``: none)."""
        self._con = con

    @classmethod
    def open(cls, run_dir: str | Path) -> InterpStore:
        """Open (building or rebuilding ``interp.duckdb`` when the sources changed) a run's explanations."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        for attempt in range(3):
            signature = source_signature(run_dir)
            if not signature:
                return cls(run_dir, None, "", None)
            target = run_dir / INTERP_DB
            if not os.access(run_dir, os.W_OK):
                target = fallback_dir(run_dir) / INTERP_DB
            if _db_signature(target) != (DB_VERSION, signature):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    build_interp_db(run_dir, target)
                except (FileNotFoundError, duckdb.IOException):  # explain consolidated its parts meanwhile: again
                    if attempt == 2:
                        raise
                    continue
            con = open_read_only(target)
            row = con.execute(INFO).fetchone()
            return cls(run_dir, con, str(row[1]) if row else signature, target)
        raise AssertionError("not reached")

    def close(self) -> None:
        if self._con is not None:
            self._con.close()

    def __enter__(self) -> InterpStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stale(self) -> bool:
        """True when explain has written (or consolidated) since this store was opened: reopen to see it."""
        return source_signature(self.run_dir) != self.signature

    def _rows(self, statement: str, params: dict[str, Any] | None = None) -> list[tuple]:
        if self._con is None:
            return []
        return cursor(self._con).execute(statement, params or {}).fetchall()

    # --- per latent -------------------------------------------------------------------------------------------
    def explanations(self, feature_id: int) -> list[Explanation]:
        """Every explainer's explanation of one latent (baselines, failed and skipped ones included), best first:
        usable ones by mean score (unscored last), ties by the newest."""
        return sorted((_explanation(r) for r in self._rows(EXPLANATIONS_OF, {"feature_id": int(feature_id)})),
                      key=lambda e: e.rank)

    def best(self, feature_ids: list[int] | np.ndarray | None = None) -> dict[int, Explanation]:
        """The best non-baseline usable explanation of each latent in ``feature_ids`` (None: every latent) that has one."""
        if feature_ids is None:
            rows = self._rows(BEST_ALL)
        else:
            ids = [int(i) for i in feature_ids]
            rows = self._rows(BEST_OF, {"ids": ids}) if ids else []
        return {int(r[0]): _explanation(r) for r in rows}

    def texts(self, keys: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], str | None]:
        """The explanation text of each (feature_id, explainer, prompt_version) in ``keys`` that exists."""
        ids = sorted({int(k[0]) for k in keys})
        wanted = {(int(f), str(w), str(v)) for f, w, v in keys}
        rows = self._rows(TEXTS_OF, {"ids": ids}) if ids else []
        return {(int(f), w, v): t for f, w, v, t in rows if (int(f), w, v) in wanted}

    def scores(self, feature_id: int, explainer: str, prompt_version: str | None = None) -> list[ScoreDetail]:
        """Each scorer's result on ``explainer``'s explanation of a latent, details parsed (newest prompt version
        first when ``prompt_version`` is None)."""
        rows = self._rows(SCORES_OF, {"feature_id": int(feature_id), "explainer": str(explainer),
                                      "prompt_version": None if prompt_version is None else str(prompt_version)})
        out = []
        rows.sort(key=lambda r: (r[2], r[3]))
        rows.sort(key=lambda r: r[2], reverse=True)
        for fid, who, version, scorer, score, n, details in rows:
            auc, excerpts = parse_details(scorer, details)
            out.append(ScoreDetail(int(fid), who, version, scorer, None if score is None else float(score), int(n or 0),
                                   auc, excerpts))
        return out

    # --- run level --------------------------------------------------------------------------------------------
    def summary(self) -> InterpSummary:
        """Counts, and the mean score per explainer (and prompt version) and scorer."""
        if self._con is None:
            return InterpSummary(0, 0, 0, 0, (), {})
        per: dict[tuple[str, str], tuple[dict, dict]] = {}
        for who, version, scorer, mean, n in self._rows(SUMMARY_SCORES):
            means, counts = per.setdefault((who, version), ({}, {}))
            means[scorer] = None if mean is None else float(mean)
            counts[scorer] = int(n)
        explainers = []
        for who, version, n, n_ok, n_failed, n_skipped, mean, baseline in self._rows(SUMMARY_EXPLANATIONS):
            means, counts = per.get((who, version), ({}, {}))
            explainers.append(ExplainerSummary(who, version, int(n), int(n_ok), int(n_failed), int(n_skipped), means, counts,
                                               None if mean is None else float(mean), bool(baseline)))
        n_rows, n_latents, n_best, n_scores = self._rows(COUNTS)[0]
        return InterpSummary(int(n_rows), int(n_latents), int(n_best), int(n_scores), tuple(explainers), self.embedding_models())

    def embedding_models(self) -> dict[str, int]:
        """Embedding model -> explanation embeddings written with it (most first)."""
        return {m: int(n) for m, n in self._rows(MODELS)}

    def embedded_best(self, model: str) -> dict[str, np.ndarray]:
        """Per latent (ascending), the best-ranked usable non-baseline explanation that has an embedding by
        ``model``: arrays feature_id, explainer, prompt_version, mean_score (NaN: unscored). What search indexes."""
        if self._con is None:
            return {"feature_id": np.zeros(0, np.int32), "explainer": np.zeros(0, object),
                    "prompt_version": np.zeros(0, object), "mean_score": np.zeros(0, np.float64)}
        out = cursor(self._con).execute(EMBEDDED_BEST, {"model": str(model)}).fetchnumpy()
        score = out["mean_score"]
        score = score.filled(np.nan) if isinstance(score, np.ma.MaskedArray) else score
        return {"feature_id": np.asarray(out["feature_id"], np.int32), "explainer": np.asarray(out["explainer"], object),
                "prompt_version": np.asarray(out["prompt_version"], object), "mean_score": np.asarray(score, np.float64)}
