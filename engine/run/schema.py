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
ATTRIBUTION = "attribution.parquet"  # head / source-token attribution of top examples (attn.hook_z SAEs)
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
        # attn.hook_z SAEs only (null otherwise, and absent from runs written before them): per head, in head order
        ("head_weight_shares", pa.list_(pa.float32())),  # share of ||W_dec[i]||^2 in the head's block
        ("head_data_shares", pa.list_(pa.float32())),  # share of pre - bias on the top examples' max tokens
        # g-SAE runs only (null otherwise, absent from runs written before it): firings the gradient alone admitted
        ("gradient_only_count", pa.int64()),
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

# One row per top example of an attn.hook_z SAE (no rows for other SAEs): the latent's pre-activation at the
# example's max token split over (head, source token), as its largest contributions plus the rest.
ATTRIBUTION_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("rank", pa.int16()),  # the top example's rank (examples.parquet: kind 'top')
        ("context_id", pa.int32()),
        ("max_pos", pa.int16()),  # the destination token
        ("dfa_heads", pa.list_(pa.int16())),  # head of each kept contribution, largest magnitude first
        ("dfa_sources", pa.list_(pa.int16())),  # its source position in the context (<= max_pos)
        ("dfa_values", pa.list_(pa.float32())),  # its contribution to the pre-activation
        ("dfa_rest", pa.float32()),  # the sum of every other (head, source) contribution
        ("dfa_bias", pa.float32()),  # the part no source contributes: pre = sum(dfa_values) + dfa_rest + dfa_bias
        ("head_terms", pa.list_(pa.float32())),  # contributions summed over all sources, per head
    ]
)

OPTIONAL_COLUMNS = {FEATURES: ("head_weight_shares", "head_data_shares", "gradient_only_count")}
"""Columns a run written by an older saescope may lack (read as nulls)."""
OPTIONAL_FILES = (ATTRIBUTION,)
"""Files a run written by an older saescope may lack (read as empty)."""

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

DERIVED = (
    "explanations.parquet", "scores.parquet", "explanation_embeddings.parquet", ".interp", "interp.duckdb",
    "evaluation.parquet", "compare",
)
"""What other commands derive from a run's latents and store inside it (explain: engine/interp/schema.py and
interp.duckdb; evaluate and compare: engine/eval/schema.py). When a run is recomputed for another model, SAE, corpus
or settings, these no longer describe its latents: ``rundir`` moves them to ``STALE/<old fingerprint>/``."""
STALE = "stale"
