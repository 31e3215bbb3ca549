"""What compare and evaluate write: file names and Arrow schemas (docs/run-format.md, "Comparisons" and
"Evaluation")."""

from __future__ import annotations

import pyarrow as pa

COMPARE_DIR = "compare"
COMPARISON = "comparison.json"
MATCHES = "matches.parquet"
MATCHES_B = "matches_b.parquet"
PAIRS = "pairs.parquet"
WIDTHS = "widths.parquet"
EVALUATION = "evaluation.parquet"
EVALUATION_META = b"saescope.evaluation"

MATCHES_SCHEMA = pa.schema([
    ("a_id", pa.int32()),
    ("best_b", pa.int32()),  # the latent of B with the most similar decoder row
    ("best_cos", pa.float32()),
    ("second_b", pa.int32()),
    ("second_cos", pa.float32()),
    ("partner_b", pa.int32()),  # one-to-one assignment; null: unmatched
    ("partner_cos", pa.float32()),
    ("best_corr", pa.float32()),  # activation correlation over the sample; null where a latent never fired
    ("partner_corr", pa.float32()),
    ("a_fires", pa.int64()),  # sample tokens where the latent fires
    ("n_children", pa.int16()),  # split children in B (>= 2: split)
])
MATCHES_B_SCHEMA = pa.schema([
    ("b_id", pa.int32()),
    ("best_a", pa.int32()),
    ("best_cos", pa.float32()),
    ("partner_a", pa.int32()),  # null: no latent of A was assigned to it
    ("b_fires", pa.int64()),
])
PAIRS_SCHEMA = pa.schema([
    ("a_id", pa.int32()),
    ("b_id", pa.int32()),
    ("cos", pa.float32()),
    ("corr", pa.float32()),
    ("n_both", pa.int64()),  # sample tokens where both fire
    ("a_fires", pa.int64()),
    ("b_fires", pa.int64()),
    ("p_a_given_b", pa.float32()),  # n_both / b_fires
    ("p_b_given_a", pa.float32()),  # n_both / a_fires
    ("child", pa.bool_()),
])
WIDTHS_SCHEMA = pa.schema([
    ("run", pa.string()),
    ("d_sae", pa.int64()),
    ("architecture", pa.string()),
    ("k", pa.int32()),
    ("n_tokens", pa.int64()),
    ("l0", pa.float64()),
    ("explained_variance", pa.float64()),
    ("ce_loss_recovered", pa.float64()),
    ("kl_div", pa.float64()),
    ("dead_fraction", pa.float64()),
    ("dense_fraction", pa.float64()),
    ("dm_error_r2", pa.float64()),
    ("dm_norm_r2", pa.float64()),
])
EVALUATION_SCHEMA = pa.schema([
    ("group", pa.string()),  # core, sparse_probing, absorption
    ("metric", pa.string()),
    ("task", pa.string()),  # a probing task, a letter, or null for the whole group
    ("k", pa.int32()),  # latents the metric uses (k-sparse probes); null otherwise
    ("value", pa.float64()),
    ("n", pa.int64()),  # samples behind the value (tokens, test texts, words); null if not one count
    ("latents", pa.list_(pa.int32())),  # the latents a k-sparse probe used (or a letter's main latents)
])


SCHEMAS = {MATCHES: MATCHES_SCHEMA, MATCHES_B: MATCHES_B_SCHEMA, PAIRS: PAIRS_SCHEMA}
