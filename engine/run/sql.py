"""Every SQL statement the query layer runs: named constants with ``$name`` bound parameters.

User text only ever reaches DuckDB as a bound parameter. The few statements that vary in an
identifier (sort column, direction) are pre-built here from allow-lists, keyed by the allowed value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import schema

if TYPE_CHECKING:
    import pyarrow as pa

# --- building the index (run once, on a writable connection) --------------------------------
# The writer sorts every Parquet file (features/examples by feature_id, contexts by context_id,
# tokens by context_id, position); a plain scan keeps that order, so tables stay clustered and
# DuckDB's zone maps skip all but one row group for a point lookup. List columns whose rows all
# have the same length become fixed-size ARRAYs, which DuckDB fetches by row about twice as fast.
TABLES = {
    "features": (schema.FEATURES, schema.FEATURES_SCHEMA),
    "examples": (schema.EXAMPLES, schema.EXAMPLES_SCHEMA),
    "contexts": (schema.CONTEXTS, schema.CONTEXTS_SCHEMA),
    "vocab": (schema.VOCAB, schema.VOCAB_SCHEMA),
    "tokens": (schema.TOKENS, schema.TOKENS_SCHEMA),
    "attribution": (schema.ATTRIBUTION, schema.ATTRIBUTION_SCHEMA),
}
NO_PROGRESS_BAR = "SET enable_progress_bar = false"
CHECKPOINT = "CHECKPOINT"
INDEX_VERSION = 4
"""Bumped whenever the index's tables change; ``RunStore.open`` rebuilds an index of another version."""
INDEX_VERSION_WRITE = "CREATE TABLE index_info AS SELECT $version::INTEGER AS version"
INDEX_VERSION_READ = "SELECT max(version) FROM index_info"
_ELEMENT_TYPES = {
    "int16": "SMALLINT", "int32": "INTEGER", "int64": "BIGINT", "float": "FLOAT", "double": "DOUBLE", "bool": "BOOLEAN",
    "string": "VARCHAR",
}


def _type(field: pa.Field) -> str:  # pyright: ignore[reportUnknownParameterType]  (pyarrow ships no type information)
    """The DuckDB type of a schema field (scalars and lists of scalars)."""
    text = str(field.type)
    return f"{_ELEMENT_TYPES[str(field.type.value_type)]}[]" if text.startswith("list<") else _ELEMENT_TYPES[text]


def list_columns(table: str, present: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(column, DuckDB element type) of a run table's list columns, from the schema (the allow-list); ``present``:
    only those among these names."""
    return [
        (f.name, _ELEMENT_TYPES[str(f.type.value_type)]) for f in TABLES[table][1]
        if str(f.type).startswith("list<") and (present is None or f.name in present)
    ]


def list_widths_statement(table: str, present: tuple[str, ...] | None = None) -> str:
    """Min and max length of each list column (of those ``present``) of a run table's Parquet file (``$path``)."""
    parts = [f"min(len({name})), max(len({name}))" for name, _ in list_columns(table, present)]
    return f"SELECT {', '.join(parts)} FROM read_parquet($path)"


def build_statement(table: str, fixed: dict[str, int], missing: tuple[str, ...] = ()) -> str:
    """``CREATE TABLE`` for a run table from its Parquet file (``$path``), casting ``fixed`` list columns to
    ARRAYs of the given (integer) widths and adding the schema's ``missing`` columns as nulls (a run written
    before them)."""
    types = dict(list_columns(table))
    casts = [f"{name}::{types[name]}[{int(width)}] AS {name}" for name, width in fixed.items()]
    replace = f" REPLACE ({', '.join(casts)})" if casts else ""
    fields = {f.name: f for f in TABLES[table][1]}
    nulls = "".join(f", NULL::{_type(fields[name])} AS {name}" for name in missing)
    return f"CREATE TABLE {table} AS SELECT *{replace}{nulls} FROM read_parquet($path)"


def create_empty_statement(table: str) -> str:
    """``CREATE TABLE`` for a run table with no rows (its file is absent from a run written before it existed)."""
    columns = ", ".join(f"{f.name} {_type(f)}" for f in TABLES[table][1])
    return f"CREATE TABLE {table} ({columns})"


# --- features -------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("feature_id", "fire_count", "density", "max_act", "mean_act", "dead", "label", "explanation")
_SUMMARY = ", ".join(SUMMARY_COLUMNS)

N_FEATURES = "SELECT count(*) FROM features"
FEATURE = "SELECT * FROM features WHERE feature_id = $feature_id"
FEATURE_SUMMARY = f"SELECT {_SUMMARY} FROM features WHERE feature_id = $feature_id"
DENSITIES = "SELECT density FROM features ORDER BY feature_id"
GRADIENT_ONLY = "SELECT gradient_only_count FROM features ORDER BY feature_id"
DEAD_IDS = "SELECT feature_id FROM features WHERE dead ORDER BY feature_id"

# examples.parquet is written in (feature_id, top before quantile, rank) order and the table keeps it: no ORDER BY
# (a sort of 70 rows still costs ~1.5 ms of operator setup)
EXAMPLES = """
SELECT kind, rank, quantile_bin, context_id, max_pos, max_act, start, acts
FROM examples
WHERE feature_id = $feature_id AND ($kind IS NULL OR kind = $kind)
"""
CONTEXTS = "SELECT context_id, token_ids FROM contexts WHERE context_id = ANY($context_ids)"
CONTEXT_IDS = "SELECT context_id FROM contexts ORDER BY context_id"
# explanations: many latents' examples at once, each latent's top examples by rank, then its quantile examples
EXAMPLES_OF = """
SELECT feature_id, kind, rank, quantile_bin, context_id, max_pos, start, acts
FROM examples
WHERE feature_id = ANY($feature_ids)
ORDER BY feature_id, kind DESC, rank
"""
LABELS = "SELECT feature_id, label FROM features WHERE feature_id = ANY($feature_ids)"
DENSITY_AND_MAX = "SELECT density, max_act FROM features ORDER BY feature_id"
# attribution.parquet is written in (feature_id, rank) order: no ORDER BY, as for examples
ATTRIBUTION = """
SELECT rank, context_id, max_pos, dfa_heads, dfa_sources, dfa_values, dfa_rest, dfa_bias, head_terms
FROM attribution
WHERE feature_id = $feature_id
"""

# bulk reads (exports): a range of latents per statement, in the order the single-latent statements give
MAX_FEATURE_ID = "SELECT max(feature_id) FROM features"
FEATURES_RANGE = "SELECT * FROM features WHERE feature_id >= $first AND feature_id < $stop ORDER BY feature_id"
EXAMPLES_RANGE = """
SELECT feature_id, kind, rank, quantile_bin, context_id, max_pos, max_act, start, acts
FROM examples
WHERE feature_id >= $first AND feature_id < $stop
ORDER BY feature_id, kind = 'quantile', rank
"""

# Sorted listings: a top-N over a million rows costs 12-20 ms, so the index also holds the summary columns
# physically sorted by each key (both directions). A filtered scan of such a table with LIMIT and no ORDER BY
# returns rows in storage order (DuckDB preserves insertion order) and stops after the page: ~1-3 ms.
SORT_KEYS = ("density", "max_act", "fire_count", "mean_act", "feature_id")
ORDER_COLUMN = {
    "density": "density", "fire_count": "density", "max_act": "max_act", "mean_act": "mean_act", "feature_id": "feature_id",
}
ORDERED_TABLES = {
    (key, descending): f"features_by_{column}_{'desc' if descending else 'asc'}"
    for key, column in ORDER_COLUMN.items()
    for descending in (True, False)
}
_BUILD_ORDERED = "CREATE TABLE {table} AS SELECT {columns} FROM features ORDER BY {column} {direction}, feature_id"
BUILD_ORDERED = {
    table: _BUILD_ORDERED.format(table=table, columns=_SUMMARY, column=ORDER_COLUMN[key], direction="DESC" if desc else "ASC")
    for (key, desc), table in ORDERED_TABLES.items()
}
_TOP_FEATURES = """
SELECT {columns} FROM {table}
WHERE ($include_dead OR NOT dead)
  AND ($min_density IS NULL OR density >= $min_density)
  AND ($max_density IS NULL OR density <= $max_density)
  AND ($min_id IS NULL OR feature_id >= $min_id)
  AND ($stop_id IS NULL OR feature_id < $stop_id)
LIMIT $limit OFFSET $offset
"""
TOP_FEATURES = {
    (key, descending): _TOP_FEATURES.format(columns=_SUMMARY, table=ORDERED_TABLES[(key, descending)])
    for key in SORT_KEYS
    for descending in (True, False)
}

# --- search ---------------------------------------------------------------------------------
SEARCH_LABEL = f"""
SELECT {_SUMMARY} FROM features
WHERE contains(lower(label), lower($text))
ORDER BY fire_count DESC, feature_id
LIMIT $limit
"""
SEARCH_TOKEN = f"""
WITH matched AS (
    SELECT coalesce(list(token_id), []) AS ids FROM vocab WHERE lower(trim(token)) = lower(trim($text))
)
SELECT {_SUMMARY},
       list_has_any(top_token_ids, matched.ids) AS fires_on,
       list_has_any(top_logit_ids, matched.ids) AS promotes
FROM features, matched
WHERE len(matched.ids) > 0
  AND (list_has_any(top_token_ids, matched.ids) OR list_has_any(top_logit_ids, matched.ids))
ORDER BY fires_on DESC, fire_count DESC, feature_id
LIMIT $limit
"""

# --- vocabulary, reconstruction rows, contexts -------------------------------------------
VOCAB = "SELECT token FROM vocab ORDER BY token_id"
CONTEXT = "SELECT token_ids FROM contexts WHERE context_id = $context_id"

TOKEN_ORDER_KEYS = (
    "err_norm", "err_linear_norm", "err_nonlinear_norm", "x_norm", "l0", "cos", "ce_delta", "ce_sae", "ce_clean",
)
_TOKEN_ROWS = """
SELECT * FROM tokens
WHERE {key} IS NOT NULL
ORDER BY {key} {direction}, context_id, position
LIMIT $limit
"""
TOKEN_L0 = "SELECT l0 FROM tokens WHERE l0 IS NOT NULL"
TOKEN_ROWS = {
    (key, descending): _TOKEN_ROWS.format(key=key, direction="DESC" if descending else "ASC")
    for key in TOKEN_ORDER_KEYS
    for descending in (True, False)
}
WORST_CONTEXTS = """
SELECT t.context_id,
       avg(t.err_norm) AS mean_err_norm,
       max(t.err_norm) AS max_err_norm,
       list(t.position ORDER BY t.position) AS positions,
       list(t.err_norm ORDER BY t.position) AS err_norms,
       list(t.err_nonlinear_norm ORDER BY t.position) AS err_nonlinear_norms,
       any_value(c.token_ids) AS token_ids
FROM tokens AS t JOIN contexts AS c ON c.context_id = t.context_id
GROUP BY t.context_id
ORDER BY mean_err_norm DESC, t.context_id
LIMIT $n
"""
