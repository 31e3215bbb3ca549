"""The SQL of interp.duckdb: how it is built from the Parquet files (a writable connection, file lists as bound
parameters) and the named statements ``InterpStore`` runs on it (read-only, bound parameters)."""

from __future__ import annotations

INTERP_DB = "interp.duckdb"
DB_VERSION = 4
"""Bumped whenever interp.duckdb's tables change; an older file is rebuilt."""

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

RANKED_BY = ("detection", "fuzzing", "embedding")
"""The scores "best" may rank by, in order of preference: per latent, the first one every usable non-baseline
explanation has (the intruder score measures the latent, not an explanation, so it never ranks)."""
_SELECT_EXPLANATIONS = """
WITH agg AS (
    SELECT feature_id, explainer, prompt_version,
           list({{'scorer': scorer, 'score': score, 'n': n_examples}} ORDER BY scorer) AS scored,
           avg(score) FILTER (WHERE scorer <> 'intruder') AS mean_score,
           max(score) FILTER (WHERE scorer = 'detection') AS s_detection,
           max(score) FILTER (WHERE scorer = 'fuzzing') AS s_fuzzing,
           max(score) FILTER (WHERE scorer = 'embedding') AS s_embedding
    FROM scores WHERE {where} GROUP BY feature_id, explainer, prompt_version
), joined AS (
    SELECT e.feature_id, e.explainer, e.prompt_version, e.explanation, e.status, e.reason, e.created_at,
           a.scored, a.mean_score, a.s_detection, a.s_fuzzing, a.s_embedding,
           starts_with(e.explainer, $baseline) AS baseline,
           (e.status = 'ok' AND e.explanation IS NOT NULL) AS usable
    FROM (SELECT * FROM raw_explanations WHERE {where}) e LEFT JOIN agg a USING (feature_id, explainer, prompt_version)
), shared AS (
    SELECT feature_id,
           CASE WHEN bool_and(s_detection IS NOT NULL) THEN 'detection'
                WHEN bool_and(s_fuzzing IS NOT NULL) THEN 'fuzzing'
                WHEN bool_and(s_embedding IS NOT NULL) THEN 'embedding' END AS rank_scorer
    FROM joined WHERE usable AND NOT baseline GROUP BY feature_id
), scored AS (
    SELECT j.*, s.rank_scorer,
           CASE s.rank_scorer WHEN 'detection' THEN j.s_detection WHEN 'fuzzing' THEN j.s_fuzzing
                              WHEN 'embedding' THEN j.s_embedding END AS rank_score
    FROM joined j LEFT JOIN shared s USING (feature_id)
), ranked AS (
    SELECT feature_id, explainer, prompt_version, explanation, status, reason, epoch_us(created_at) AS created_us,
           scored, mean_score, baseline, usable, rank_scorer, rank_score,
           row_number() OVER (PARTITION BY feature_id
               ORDER BY usable DESC, rank_score DESC NULLS LAST, (mean_score IS NOT NULL) DESC,
                        created_at DESC NULLS LAST, explainer, prompt_version) AS rank
    FROM scored
)
SELECT *, (usable AND NOT baseline AND rank = min(CASE WHEN usable AND NOT baseline THEN rank END)
           OVER (PARTITION BY feature_id)) AS is_best
FROM ranked ORDER BY feature_id, rank
"""
"""The ``explanations`` table computed from ``raw_explanations`` and ``scores`` for the latents ``{where}`` keeps (all
of them when built, the touched ones when new parts are applied). Best first: usable explanations by the one score
every usable non-baseline explanation of the latent has (``RANKED_BY``; baselines are ranked by it too), then scored
before unscored, then the newest."""
BUILD_EXPLANATIONS = "CREATE TABLE explanations AS " + _SELECT_EXPLANATIONS.format(where="TRUE")
_TOUCHED = "feature_id IN (SELECT feature_id FROM touched)"
REDO_TOUCHED = ("DELETE FROM explanations WHERE " + _TOUCHED,
                "INSERT INTO explanations " + _SELECT_EXPLANATIONS.format(where=_TOUCHED))
"""Recompute the ranks of the latents new parts touched (every other latent's rows stay as they are)."""

# --- applying new parts to a copy of the database (same writable connection kind) --------------------------------
NEW_ROWS = f"""
CREATE TEMP TABLE new_rows AS SELECT {{columns}} FROM {_READ.format(files="$files")}
QUALIFY row_number() OVER (PARTITION BY {{keys}} ORDER BY {_ORD} DESC) = 1
"""
"""The rows of the new parts, deduplicated among themselves (the newest part's row kept)."""
REPLACE_ROWS = ("DELETE FROM {table} t USING new_rows n WHERE {match}",
                "INSERT INTO {table} SELECT {columns} FROM new_rows ORDER BY feature_id",
                "INSERT INTO touched SELECT DISTINCT feature_id FROM new_rows",
                "DROP TABLE new_rows")
"""Rows the new parts rewrite (same key) are replaced; their latents are marked touched."""
CREATE_TOUCHED = "CREATE TEMP TABLE touched (feature_id INTEGER)"
DEDUPE_TOUCHED = "CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT feature_id FROM touched"
LOG_TOUCHED = "INSERT INTO refresh_log SELECT $seq::INTEGER, $signature::VARCHAR, feature_id FROM touched"
CREATE_LOG = "CREATE TABLE refresh_log (seq INTEGER, signature VARCHAR, feature_id INTEGER)"
"""Which latents each incremental refresh touched (``seq`` counts refreshes since the last full build, ``signature``
is the database's after it): how the search index learns what to update."""
BUILD_INFO = ("CREATE TABLE interp_info AS SELECT $version::INTEGER AS version, $signature::VARCHAR AS signature, "
              "$sources::VARCHAR AS sources, $signature::VARCHAR AS base_signature, 0 AS seq")
"""``sources``: the JSON list of source files (with sizes and mtimes) the database holds; ``base_signature``: the
signature of the last full build (incremental refreshes since are in ``refresh_log``)."""
UPDATE_INFO = "UPDATE interp_info SET signature = $signature, sources = $sources, seq = seq + 1"
STATE = "SELECT max(version), max(signature), max(sources), max(base_signature), max(seq) FROM interp_info"

# --- reading (read-only connection) -------------------------------------------------------------------------------
INFO = "SELECT max(version), max(signature) FROM interp_info"
SEQ_OF = """
SELECT CASE WHEN $signature = (SELECT max(base_signature) FROM interp_info) THEN 0
            ELSE (SELECT max(seq) FROM refresh_log WHERE signature = $signature) END
"""
"""Which refresh produced the database state ``$signature`` (0: the full build; NULL: unknown, rebuilt since)."""
CHANGED_AFTER = "SELECT DISTINCT feature_id FROM refresh_log WHERE seq > $seq ORDER BY feature_id"
_EXPLANATION_COLUMNS = ("feature_id, explainer, prompt_version, explanation, status, reason, created_us, scored, "
                        "mean_score, rank, rank_scorer, rank_score")
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
INTRUDER_OF = """
SELECT feature_id, avg(score) FROM scores
WHERE scorer = 'intruder' AND score IS NOT NULL AND feature_id IN (SELECT unnest($ids)) GROUP BY feature_id
"""
"""The intruder score of each latent (the mean where several judges ran it): it measures the latent, whoever
explained it."""
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
EMBEDDED_BEST_OF = EMBEDDED_BEST.replace("WHERE e.usable", "WHERE e.feature_id IN (SELECT unnest($ids)) AND e.usable")
"""The same for the latents ``$ids`` only (what an index update re-reads)."""
