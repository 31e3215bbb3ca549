"""Query layer over a run's explanations and scores (docs/explanations.md): ``InterpStore.open(run_dir)``.

The run's ``explanations.parquet``, ``scores.parquet`` and the keys of ``explanation_embeddings.parquet``, plus any
batches ``saescope explain`` has not folded in yet (``.interp/parts/``), are loaded into a small DuckDB file
``interp.duckdb`` next to them (built aside and renamed into place; in a temp folder when the run directory is
not writable). It records the list (name, size, mtime) of its source files. At the next open, new part folders
(a batch of a running ``explain``, a live explanation) are applied to a copy of it: only their rows are read, the
rows they rewrite replaced and the ranks of the latents they touch recomputed (the file is copied, not rebuilt);
any other change (explain consolidated its parts, a file was rewritten) rebuilds it from scratch. The store opens
it read-only with external access disabled and runs every statement with bound parameters on a fresh cursor: one
store can serve many threads. A run without explanations opens too and simply has none.

Which explanation is *best* for a latent: among its non-baseline explanations with status ``ok``, the highest
value of the one score they all have (the first of detection, fuzzing, embedding that each of them has: a live
explanation scored by embedding alone competes on embedding AUROC), then scored before unscored, ties by the
newest ``created_at`` (``sql.BUILD_EXPLANATIONS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from ..run.index import cursor, open_read_only
from . import sql
from .index import fallback_dir, refresh_interp_db, source_signature
from .rows import ExplainerSummary, Explanation, InterpSummary, explanation
from .scorers import ScoreDetail, parse_details, score_extras


class InterpStore:
    """Read-only queries over a run's explanations and scores. Create with ``InterpStore.open(run_dir)``."""

    def __init__(self, run_dir: Path, con: duckdb.DuckDBPyConnection | None, signature: str, db_path: Path | None,
                 refresh: str = "current"):
        self.run_dir = run_dir
        self.refresh = refresh
        """How ``open`` found interp.duckdb: ``current``, ``applied`` (new parts added to it) or ``built``."""
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
            if not source_signature(run_dir):
                return cls(run_dir, None, "", None)
            target = run_dir / sql.INTERP_DB
            if not os.access(run_dir, os.W_OK):
                target = fallback_dir(run_dir) / sql.INTERP_DB
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                how = refresh_interp_db(run_dir, target)
            except (FileNotFoundError, duckdb.IOException):  # explain consolidated its parts meanwhile: again
                if attempt == 2:
                    raise
                continue
            con = open_read_only(target)
            row = con.execute(sql.INFO).fetchone()
            return cls(run_dir, con, str(row[1]) if row else "", target, how)
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

    def changed_since(self, signature: str) -> np.ndarray | None:
        """The latents whose explanations, scores or embeddings changed since the database had ``signature`` (an
        earlier ``self.signature``), ascending; None when that state is not in this database's refresh log (a full
        build since): then anything may have changed."""
        if self._con is None:
            return None
        if signature == self.signature:
            return np.zeros(0, np.int32)
        seq = self._rows(sql.SEQ_OF, {"signature": str(signature)})[0][0]
        if seq is None:
            return None
        return np.array([r[0] for r in self._rows(sql.CHANGED_AFTER, {"seq": int(seq)})], np.int32)

    def _rows(self, statement: str, params: dict[str, Any] | None = None) -> list[tuple]:
        if self._con is None:
            return []
        return cursor(self._con).execute(statement, params or {}).fetchall()

    # --- per latent -------------------------------------------------------------------------------------------
    def explanations(self, feature_id: int) -> list[Explanation]:
        """Every explainer's explanation of one latent (baselines, failed and skipped ones included), best first:
        usable ones by the score they all have (``Explanation.rank_scorer``), ties by the newest."""
        return sorted((explanation(r) for r in self._rows(sql.EXPLANATIONS_OF, {"feature_id": int(feature_id)})),
                      key=lambda e: e.rank)

    def best(self, feature_ids: list[int] | np.ndarray | None = None) -> dict[int, Explanation]:
        """The best non-baseline usable explanation of each latent in ``feature_ids`` (None: every latent) that has one."""
        if feature_ids is None:
            rows = self._rows(sql.BEST_ALL)
        else:
            ids = [int(i) for i in feature_ids]
            rows = self._rows(sql.BEST_OF, {"ids": ids}) if ids else []
        return {int(r[0]): explanation(r) for r in rows}

    def intruder(self, feature_ids: list[int] | np.ndarray) -> dict[int, float]:
        """The intruder score (``engine.interp.intruder``) of each latent in ``feature_ids`` that has one."""
        ids = [int(i) for i in feature_ids]
        return {int(f): float(v) for f, v in self._rows(sql.INTRUDER_OF, {"ids": ids})} if ids else {}

    def texts(self, keys: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], str | None]:
        """The explanation text of each (feature_id, explainer, prompt_version) in ``keys`` that exists."""
        ids = sorted({int(k[0]) for k in keys})
        wanted = {(int(f), str(w), str(v)) for f, w, v in keys}
        rows = self._rows(sql.TEXTS_OF, {"ids": ids}) if ids else []
        return {(int(f), w, v): t for f, w, v, t in rows if (int(f), w, v) in wanted}

    def scores(self, feature_id: int, explainer: str, prompt_version: str | None = None) -> list[ScoreDetail]:
        """Each scorer's result on ``explainer``'s explanation of a latent, details parsed (newest prompt version
        first when ``prompt_version`` is None)."""
        rows = self._rows(sql.SCORES_OF, {"feature_id": int(feature_id), "explainer": str(explainer),
                                      "prompt_version": None if prompt_version is None else str(prompt_version)})
        out = []
        rows.sort(key=lambda r: (r[2], r[3]))
        rows.sort(key=lambda r: r[2], reverse=True)
        for fid, who, version, scorer, score, n, details in rows:
            auc, excerpts = parse_details(scorer, details)
            out.append(ScoreDetail(int(fid), who, version, scorer, None if score is None else float(score), int(n or 0),
                                   auc, excerpts, **score_extras(details)))
        return out

    # --- run level --------------------------------------------------------------------------------------------
    def summary(self) -> InterpSummary:
        """Counts, and the mean score per explainer (and prompt version) and scorer."""
        if self._con is None:
            return InterpSummary(0, 0, 0, 0, (), {})
        per: dict[tuple[str, str], tuple[dict, dict]] = {}
        for who, version, scorer, mean, n in self._rows(sql.SUMMARY_SCORES):
            means, counts = per.setdefault((who, version), ({}, {}))
            means[scorer] = None if mean is None else float(mean)
            counts[scorer] = int(n)
        explainers = []
        for who, version, n, n_ok, n_failed, n_skipped, mean, baseline in self._rows(sql.SUMMARY_EXPLANATIONS):
            means, counts = per.get((who, version), ({}, {}))
            explainers.append(ExplainerSummary(who, version, int(n), int(n_ok), int(n_failed), int(n_skipped), means, counts,
                                               None if mean is None else float(mean), bool(baseline)))
        n_rows, n_latents, n_best, n_scores = self._rows(sql.COUNTS)[0]
        return InterpSummary(int(n_rows), int(n_latents), int(n_best), int(n_scores), tuple(explainers), self.embedding_models())

    def embedding_models(self) -> dict[str, int]:
        """Embedding model -> explanation embeddings written with it (most first)."""
        return {m: int(n) for m, n in self._rows(sql.MODELS)}

    def embedded_best(self, model: str, feature_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per latent (ascending; of ``feature_ids`` only when given), the best-ranked usable non-baseline
        explanation that has an embedding by ``model``: arrays feature_id, explainer, prompt_version, mean_score
        (NaN: unscored). What search indexes."""
        if self._con is None:
            return {"feature_id": np.zeros(0, np.int32), "explainer": np.zeros(0, object),
                    "prompt_version": np.zeros(0, object), "mean_score": np.zeros(0, np.float64)}
        if feature_ids is None:
            out = cursor(self._con).execute(sql.EMBEDDED_BEST, {"model": str(model)}).fetchnumpy()
        else:
            out = cursor(self._con).execute(sql.EMBEDDED_BEST_OF, {"model": str(model),
                                                                   "ids": [int(i) for i in feature_ids]}).fetchnumpy()
        score = out["mean_score"]
        score = score.filled(np.nan) if isinstance(score, np.ma.MaskedArray) else score
        return {"feature_id": np.asarray(out["feature_id"], np.int32), "explainer": np.asarray(out["explainer"], object),
                "prompt_version": np.asarray(out["prompt_version"], object), "mean_score": np.asarray(score, np.float64)}
