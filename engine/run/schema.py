"""The run directory's files and Parquet columns: the one place both the writer and the query layer read."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
FEATURES = "features.parquet"
EXAMPLES = "examples.parquet"
CONTEXTS = "contexts.parquet"
VOCAB = "vocab.parquet"
TOKENS = "tokens.parquet"
DARK_MATTER = "dark_matter.safetensors"
INDEX = "index.duckdb"  # DuckDB tables built from the Parquet files (sorted for the query layer)

FEATURES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("fire_count", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),  # mean over the tokens where the latent fires
        ("dead", pa.bool_()),
        ("hist_counts", pa.list_(pa.int64())),  # firing activations binned on [0, max_act]
        ("hist_edges", pa.list_(pa.float32())),
        ("top_logit_ids", pa.list_(pa.int32())),
        ("top_logit_values", pa.list_(pa.float32())),
        ("bottom_logit_ids", pa.list_(pa.int32())),
        ("bottom_logit_values", pa.list_(pa.float32())),
        ("neighbor_ids", pa.list_(pa.int32())),
        ("neighbor_cos", pa.list_(pa.float32())),
        ("top_token_ids", pa.list_(pa.int32())),  # tokens carrying most activation in its examples
        ("label", pa.string()),
        ("explanation", pa.string()),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("kind", pa.string()),  # 'top' or 'quantile'
        ("rank", pa.int16()),  # order within (feature_id, kind)
        ("quantile_bin", pa.int16()),  # null for 'top'
        ("context_id", pa.int32()),
        ("max_pos", pa.int16()),  # position of the max activation within the context
        ("max_act", pa.float32()),
        ("start", pa.int16()),  # first context position covered by acts
        ("acts", pa.list_(pa.float32())),  # activation on each token of the window
    ]
)

CONTEXTS_SCHEMA = pa.schema([("context_id", pa.int32()), ("token_ids", pa.list_(pa.int32()))])

VOCAB_SCHEMA = pa.schema([("token_id", pa.int32()), ("token", pa.string())])

TOKENS_SCHEMA = pa.schema(
    [
        ("context_id", pa.int32()),
        ("position", pa.int16()),
        ("token_id", pa.int32()),
        ("l0", pa.int32()),
        ("x_norm", pa.float32()),
        ("err_norm", pa.float32()),
        ("cos", pa.float32()),
        ("err_linear_norm", pa.float32()),  # norm of the part of the error the linear map predicts
        ("err_nonlinear_norm", pa.float32()),  # norm of what it leaves
        ("ce_clean", pa.float32()),  # next-token loss predicting position+1; null where not sampled
        ("ce_sae", pa.float32()),
        ("ce_delta", pa.float32()),
    ]
)
