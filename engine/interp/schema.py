"""What explain writes into a run: file names and Arrow schemas (docs/run-format.md, "Explanations")."""

from __future__ import annotations

import pyarrow as pa

EXPLANATIONS = "explanations.parquet"
SCORES = "scores.parquet"
EMBEDDINGS = "explanation_embeddings.parquet"
INTERP_DIR = ".interp"

EXPLANATIONS_SCHEMA = pa.schema([
    ("feature_id", pa.int32()),
    ("explanation", pa.string()),  # null when the explainer failed (see status, reason)
    ("explainer", pa.string()),
    ("prompt_version", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()),  # 'ok', 'failed' (junk or error) or 'skipped' (no examples)
    ("reason", pa.string()),
])
SCORES_SCHEMA = pa.schema([
    ("feature_id", pa.int32()),
    ("explainer", pa.string()),
    ("prompt_version", pa.string()),
    ("scorer", pa.string()),
    ("score", pa.float64()),  # balanced accuracy (detection, fuzzing) or AUROC (embedding); null if undefined
    ("n_examples", pa.int32()),
    ("details", pa.string()),  # JSON: per-excerpt context ids, labels, predictions; auroc of the classifiers
])
EMBEDDINGS_SCHEMA = pa.schema([
    ("feature_id", pa.int32()),
    ("explainer", pa.string()),
    ("prompt_version", pa.string()),
    ("model", pa.string()),  # the embedding model
    ("embedding", pa.list_(pa.float32())),  # unit length
])
FILES = {EXPLANATIONS: EXPLANATIONS_SCHEMA, SCORES: SCORES_SCHEMA, EMBEDDINGS: EMBEDDINGS_SCHEMA}
KEYS = {
    EXPLANATIONS: ("feature_id", "explainer", "prompt_version"),
    SCORES: ("feature_id", "explainer", "prompt_version", "scorer"),
    EMBEDDINGS: ("feature_id", "explainer", "prompt_version", "model"),  # one per embedding model
}
