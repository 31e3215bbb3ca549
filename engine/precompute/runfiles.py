"""Turning the pass's accumulators into the run's files: examples and labels, feature columns, token rows."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from ..run import parquet, schema
from .darkmatter import LinearErrorMap
from .features import labels_from_examples, latent_neighbors, logit_effects
from .heads import HEAD_TERMS, data_shares, weight_shares
from .reservoirs import ExampleReservoirs, ExampleRows
from .sampling import ContextSample

T = TypeVar("T")
R = TypeVar("R")


def token_rows(sample: ContextSample, slots: torch.Tensor, error_map: LinearErrorMap, losses: dict | None) -> tuple[dict, float]:
    """tokens.parquet columns for the sampled contexts, and corr(||linear part||, ||error||) over them."""
    n, pos = len(slots), sample.token_ids.shape[1]
    x = sample.x[slots].flatten(0, 1)
    e = sample.err[slots].flatten(0, 1)
    linear, nonlinear = error_map.split(x, e)
    mask = sample.mask[slots].reshape(-1).numpy()
    err_norm = e.norm(dim=-1)
    lin_norm = linear.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(x, x - e, dim=-1)
    cols = {
        "context_id": sample.context_id[slots][:, None].expand(n, pos).reshape(-1).numpy(),
        "position": np.tile(np.arange(pos), n),
        "token_id": sample.token_ids[slots].reshape(-1).numpy(),
        "l0": sample.l0[slots].reshape(-1).cpu().numpy(),
        "x_norm": x.norm(dim=-1).cpu().numpy(),
        "err_norm": err_norm.cpu().numpy(),
        "cos": cos.cpu().numpy(),
        "err_linear_norm": lin_norm.cpu().numpy(),
        "err_nonlinear_norm": nonlinear.norm(dim=-1).cpu().numpy(),
    }
    for key, name in (("clean", "ce_clean"), ("sae", "ce_sae")):
        values = np.full((n, pos), np.nan, dtype=np.float32)
        if losses is not None:
            values[:, :-1] = losses[key].numpy()
        cols[name] = values.reshape(-1)
    cols["ce_delta"] = cols["ce_sae"] - cols["ce_clean"]
    cols = {k: v[mask] for k, v in cols.items()}
    corr = float("nan")
    if mask.sum() > 2:
        a, b = cols["err_linear_norm"].astype(np.float64), cols["err_norm"].astype(np.float64)
        if a.std() > 0 and b.std() > 0:
            corr = float(np.corrcoef(a, b)[0, 1])
    return cols, corr


def ordered_map(fn: Callable[[T], R], items: list[T], workers: int, ahead: int = 2) -> Iterator[R]:
    """``map(fn, items)`` by ``workers`` threads, in order, with at most ``workers * ahead`` results waiting (so a slow
    consumer does not let every result pile up in memory); ``workers <= 1``: in this thread."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_workers() -> int:
    """Threads that prepare the examples file's latent ranges: the CPUs torch uses, at most 8."""
    return max(1, min(8, torch.get_num_threads()))


class RangeFiles(NamedTuple):
    """One latent range's share of the examples and attribution files (``range_files``)."""

    latents: range
    labels: list[str]
    top_tokens: list[np.ndarray]
    examples: pa.Table
    attribution: pa.Table | None
    """The range's attribution rows; None where the reservoirs carry no head attribution."""
    head_sums: np.ndarray | None
    """``[len(latents), terms]``: each latent's head terms summed over its top examples (None: no attribution)."""


def range_files(rows: ExampleRows, latents: range, ctx_ids: np.ndarray, ctx_tokens: np.ndarray,
                vocab: list[str]) -> RangeFiles:
    """Labels, top tokens and the Arrow tables of the example ``rows`` of ``latents`` (their contexts' tokens among
    ``ctx_ids``/``ctx_tokens``, ``parquet.read_context_tokens``)."""
    if len(rows.context_id):
        tokens = ctx_tokens[np.searchsorted(ctx_ids, rows.context_id)]
        window = rows.acts.shape[1]
        if window < tokens.shape[1]:  # each example's own window of its context
            tokens = np.take_along_axis(tokens, rows.start.astype(np.int64)[:, None] + np.arange(window), 1)
    else:
        tokens = np.zeros(rows.acts.shape, np.int32)
    labels, tops = labels_from_examples(latents, rows.feature_id, rows.acts, tokens, vocab)
    examples = parquet.table(example_columns(rows), schema.EXAMPLES_SCHEMA)
    attribution = head_sums = None
    if rows.payload is not None and HEAD_TERMS in rows.payload:
        top = rows.kind == 0
        terms = rows.payload[HEAD_TERMS]
        head_sums = np.zeros((len(latents), terms.shape[1]), np.float64)
        np.add.at(head_sums, rows.feature_id[top] - latents.start, terms[top])
        attribution = parquet.table(attribution_columns(rows, top), schema.ATTRIBUTION_SCHEMA)
    return RangeFiles(latents, labels, [t[t >= 0] for t in tops], examples, attribution, head_sums)


EXAMPLE_RANGE = 256
"""Latents per range of the examples file (one or more row groups each)."""


def write_examples(
    staging: Path, reservoirs: ExampleReservoirs, vocab: list[str], workers: int | None = None
) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None] | None]:
    """Write examples.parquet and attribution.parquet (rows only when the reservoirs carry head attribution) a range
    of ``EXAMPLE_RANGE`` latents at a time, in latent order; returns each latent's label, top tokens and data-based
    head shares (None: no attribution). The ranges are prepared by ``workers`` threads here (default
    ``write_workers()``), or, where the reservoirs offer ``remote_ranges`` (a sharded merge on Ray), by tasks of the
    cluster; the files are the same either way, and for any number of workers."""
    remote = getattr(reservoirs, "remote_ranges", None)
    if remote is not None:
        parts = remote(staging, vocab, EXAMPLE_RANGE)
    else:
        workers = write_workers() if workers is None else workers
        ctx_ids, ctx_tokens = parquet.read_context_tokens(staging / schema.CONTEXTS, reservoirs.context_ids())

        def prepare(latents: range) -> RangeFiles:
            return range_files(reservoirs.rows_of(latents), latents, ctx_ids, ctx_tokens, vocab)

        # latent ranges are read, labelled and turned into tables by ``workers`` threads (torch, numpy and Arrow
        # release the GIL), and written here in latent order
        parts = ordered_map(prepare, reservoirs.ranges(chunk=EXAMPLE_RANGE), workers)
    labels: list[str] = []
    tops: list[np.ndarray] = []
    terms = reservoirs.payload.get(HEAD_TERMS)
    head_sums = None if terms is None else np.zeros((terms.shape[0], terms.shape[2]), np.float64)
    with (pq.ParquetWriter(staging / schema.EXAMPLES, schema.EXAMPLES_SCHEMA, compression="zstd") as writer,
          pq.ParquetWriter(staging / schema.ATTRIBUTION, schema.ATTRIBUTION_SCHEMA, compression="zstd") as dfa_writer):
        for part in parts:
            labels += part.labels
            tops += part.top_tokens
            writer.write_table(part.examples, row_group_size=8192)
            if part.attribution is not None and head_sums is not None:
                head_sums[part.latents.start : part.latents.stop] = part.head_sums
                dfa_writer.write_table(part.attribution, row_group_size=8192)
    return labels, tops, None if head_sums is None else data_shares(head_sums)


def attribution_columns(rows: ExampleRows, top: np.ndarray) -> dict:
    """attribution.parquet columns of the top rows of ``rows`` (the kept contributions are a prefix: padding last)."""
    payload = rows.payload or {}
    heads, sources, values = (payload[name][top] for name in ("dfa_head", "dfa_source", "dfa_value"))
    kept = heads >= 0
    offsets = np.concatenate([[0], np.cumsum(kept.sum(1))])
    return {
        "feature_id": rows.feature_id[top],
        "rank": rows.rank[top],
        "context_id": rows.context_id[top],
        "max_pos": rows.max_pos[top],
        "dfa_heads": parquet.list_array(heads[kept], offsets, pa.int16()),
        "dfa_sources": parquet.list_array(sources[kept], offsets, pa.int16()),
        "dfa_values": parquet.list_array(values[kept].astype(np.float32), offsets),
        "dfa_rest": payload["dfa_rest"][top].astype(np.float32),
        "dfa_bias": payload["dfa_bias"][top].astype(np.float32),
        "head_terms": parquet.list_array(payload[HEAD_TERMS][top].astype(np.float32)),
    }


LOGIT_COLUMNS = ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values")
NEIGHBORS_INFO = "neighbors"
"""The key of ``latent_facts`` that is no column: how the neighbours were found (the manifest's ``neighbors``)."""


FACT_TYPES = {
    "top_logit_ids": pa.list_(pa.int32()), "top_logit_values": pa.list_(pa.float32()),
    "bottom_logit_ids": pa.list_(pa.int32()), "bottom_logit_values": pa.list_(pa.float32()),
    "neighbor_ids": pa.list_(pa.int32()), "neighbor_cos": pa.list_(pa.float32()),
    "head_weight_shares": pa.list_(pa.float32()),
}
"""The weight-only feature columns and their Arrow types."""


def _nulls(d_sae: int, *names: str) -> dict:
    """Null columns of ``d_sae`` rows for the weight-only facts ``names`` (left to the feature page, or not yet)."""
    return {name: pa.nulls(d_sae, FACT_TYPES[name]) for name in names}


def costly_facts(d_sae: int, cfg) -> bool:
    """Whether the weight-only facts take long enough to keep a first snapshot waiting: the neighbours go through
    the IVF index (wider than ``neighbors_exact_max``, not left to the feature page)."""
    return cfg.neighbors_exact_max < d_sae <= cfg.neighbors_on_demand_above


def latent_facts(lm, sae, cfg, *, pending: bool = False) -> dict:
    """The feature columns that depend on the weights only (logit effects, decoder neighbours): computed once
    per run, whatever the number of snapshots. ``pending``: none of them yet (null columns, the neighbours'
    method ``pending``): what a wide run's first snapshot shows, so that it need not wait for them."""
    d_sae = sae.cfg.d_sae
    if pending:
        return {**_nulls(d_sae, *FACT_TYPES), NEIGHBORS_INFO: {"method": "pending", "n": cfg.n_neighbors}}
    # attn.hook_z decoders write per-head outputs: logit_effects maps them through the output projection first
    if d_sae > cfg.logits_on_demand_above:  # on demand: the feature page computes one latent's
        logit_cols = _nulls(d_sae, *LOGIT_COLUMNS)
    else:
        effects = logit_effects(lm, sae, cfg.n_logits)
        logit_cols = {
            "top_logit_ids": parquet.list_array(effects.top_ids, pa_type=pa.int32()),
            "top_logit_values": parquet.list_array(effects.top_values),
            "bottom_logit_ids": parquet.list_array(effects.bottom_ids, pa_type=pa.int32()),
            "bottom_logit_values": parquet.list_array(effects.bottom_values),
        }
    if d_sae > cfg.neighbors_on_demand_above:  # on demand: the feature page finds one latent's, exactly
        neighbor_cols = _nulls(d_sae, "neighbor_ids", "neighbor_cos")
        info = {"method": "on_demand", "n": cfg.n_neighbors}
    else:
        # bf16 candidates where the model runs in bf16 (auto picks it only where bf16 matmuls are fast)
        search = torch.bfloat16 if lm.dtype == torch.bfloat16 else None
        neighbors = latent_neighbors(sae, cfg.n_neighbors, exact_max=cfg.neighbors_exact_max,
                                     n_probe=cfg.neighbors_probe, search_dtype=search, seed=cfg.seed)
        neighbor_cols = {"neighbor_ids": parquet.list_array(neighbors.ids, pa_type=pa.int32()),
                         "neighbor_cos": parquet.list_array(neighbors.cos)}
        info = neighbors.info
    shares = weight_shares(lm, sae)
    return {
        "head_weight_shares": pa.nulls(d_sae, FACT_TYPES["head_weight_shares"]) if shares is None
        else parquet.list_array(shares),
        **logit_cols,
        **neighbor_cols,
        NEIGHBORS_INFO: info,
    }


def feature_columns(
    facts: dict, summary, labels: list[str], top_tokens: list[np.ndarray], head_data: list[np.ndarray | None] | None = None
) -> dict:
    """features.parquet columns: the pass's statistics and labels next to the weight-only ``latent_facts``, and the
    data-based head shares (None: no head attribution in this run)."""
    d_sae = len(summary.fire_count)
    data_type = pa.list_(pa.float32())
    return {
        "feature_id": np.arange(d_sae, dtype=np.int32),
        "fire_count": summary.fire_count,
        "density": summary.density,
        "max_act": summary.max_act,
        "mean_act": summary.mean_act,
        "dead": summary.fire_count == 0,
        "hist_counts": parquet.ragged_list_array(summary.hist_counts, pa.int64()),
        "hist_edges": parquet.ragged_list_array(summary.hist_edges, pa.float32()),
        **{k: v for k, v in facts.items() if k != NEIGHBORS_INFO},
        "top_token_ids": parquet.ragged_list_array(top_tokens, pa.int32()),
        "label": labels,
        "explanation": [None] * d_sae,
        "head_data_shares": pa.nulls(d_sae, data_type) if head_data is None else pa.array(
            [None if v is None else v.tolist() for v in head_data], type=data_type),
        "gradient_only_count": pa.nulls(d_sae, pa.int64()) if summary.gradient_only_count is None else pa.array(
            summary.gradient_only_count, type=pa.int64()),
    }


def write_files(staging: Path, features: dict, vocab: list[str], token_rows: dict, error_map: LinearErrorMap) -> dict:
    """Write the remaining Parquet files and the error map; returns ``{file: {rows, bytes}}`` for all files."""
    parquet.write_table(staging / schema.FEATURES, features, schema.FEATURES_SCHEMA, row_group_size=16384)
    vocab_columns = {"token_id": np.arange(len(vocab), dtype=np.int32), "token": vocab}
    parquet.write_table(staging / schema.VOCAB, vocab_columns, schema.VOCAB_SCHEMA)
    parquet.write_table(staging / schema.TOKENS, {k: _nullable(v) for k, v in token_rows.items()}, schema.TOKENS_SCHEMA)
    save_file(
        {
            "W": error_map.W.cpu(),
            "b": error_map.b.cpu(),
            "w_norm": error_map.w_norm.cpu(),
            "b_norm": torch.tensor([error_map.b_norm]),
        },
        str(staging / schema.DARK_MATTER),
    )
    names = (schema.FEATURES, schema.EXAMPLES, schema.ATTRIBUTION, schema.CONTEXTS, schema.VOCAB, schema.TOKENS)
    return {
        name: {"rows": pq.ParquetFile(staging / name).metadata.num_rows, "bytes": (staging / name).stat().st_size}
        for name in names
    }


def example_columns(rows: ExampleRows) -> dict:
    return {
        "feature_id": rows.feature_id,
        "kind": np.where(rows.kind == 0, "top", "quantile").tolist(),
        "rank": rows.rank,
        "quantile_bin": pa.array(rows.quantile_bin, mask=rows.quantile_bin < 0),
        "context_id": rows.context_id,
        "max_pos": rows.max_pos,
        "max_act": rows.max_act,
        "start": rows.start.astype(np.int16),
        "acts": parquet.list_array(rows.acts.astype(np.float32)),
    }


def _nullable(values: np.ndarray):
    if values.dtype.kind == "f":
        return pa.array(values, mask=np.isnan(values))
    return values
