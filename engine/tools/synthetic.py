"""A synthetic run directory at scale (default 1,000,000 latents x 20 examples x 64 tokens) for the query benchmark.

It goes through the same writers and index builder as a real run, so the benchmark measures the real layout.
Generated once and cached (``data/cache/bench_store``, git-ignored); its manifest records the parameters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from ..run import parquet, rundir, schema
from ..run.index import build_index

DEFAULTS = {"n_features": 1_000_000, "n_examples": 20, "width": 64, "n_contexts": 100_000, "vocab": 50_000, "seed": 0}


def _features_chunk(rng: np.random.Generator, start: int, n: int, p: dict, n_tokens: int) -> pa.Table:
    density = rng.lognormal(-6, 1.5, n).clip(0, 1)
    density[rng.random(n) < 0.02] = 0.0  # some dead latents
    fire = np.round(density * n_tokens).astype(np.int64)
    max_act = (rng.gamma(2.0, 3.0, n) * (fire > 0)).astype(np.float32)
    bins = 32
    edges = (np.linspace(0, 1, bins + 1, dtype=np.float32)[None, :] * max_act[:, None]).astype(np.float32)
    hist = rng.integers(0, 100, (n, bins), dtype=np.int64)
    vocab_ids = lambda m: rng.integers(0, p["vocab"], (n, m), dtype=np.int32)  # noqa: E731
    tokens = vocab_ids(10)
    words = np.array([f"w{i}" for i in range(p["vocab"])])
    labels = np.char.add(np.char.add(words[tokens[:, 0]], " / "), words[tokens[:, 1]])
    columns = {
        "feature_id": np.arange(start, start + n, dtype=np.int32),
        "fire_count": fire,
        "density": fire / n_tokens,
        "max_act": max_act,
        "mean_act": max_act * 0.3,
        "dead": fire == 0,
        "hist_counts": parquet.list_array(hist, pa_type=pa.int64()),
        "hist_edges": parquet.list_array(edges),
        "top_logit_ids": parquet.list_array(vocab_ids(10), pa_type=pa.int32()),
        "top_logit_values": parquet.list_array(rng.random((n, 10), dtype=np.float32)),
        "bottom_logit_ids": parquet.list_array(vocab_ids(10), pa_type=pa.int32()),
        "bottom_logit_values": parquet.list_array(-rng.random((n, 10), dtype=np.float32)),
        "neighbor_ids": parquet.list_array(rng.integers(0, p["n_features"], (n, 10), dtype=np.int32), pa_type=pa.int32()),
        "neighbor_cos": parquet.list_array(rng.random((n, 10), dtype=np.float32)),
        "top_token_ids": parquet.list_array(tokens, pa_type=pa.int32()),
        "label": labels.tolist(),
        "explanation": pa.nulls(n, pa.string()),
    }
    return parquet.table(columns, schema.FEATURES_SCHEMA)


def _examples_chunk(rng: np.random.Generator, start: int, n: int, p: dict) -> pa.Table:
    k, width = p["n_examples"], p["width"]
    rows = n * k
    acts = np.zeros((rows, width), np.float32)
    hot = rng.integers(0, width, (rows, 4))
    np.put_along_axis(acts, hot, rng.gamma(2.0, 2.0, (rows, 4)).astype(np.float32), axis=1)
    rank = np.tile(np.arange(k, dtype=np.int16), n)
    n_top = k // 2
    quantile = rank >= n_top
    qbin = np.where(quantile, rank - n_top, -1).astype(np.int16)  # one example per interval
    columns = {
        "feature_id": np.repeat(np.arange(start, start + n, dtype=np.int32), k),
        "kind": pa.DictionaryArray.from_arrays(
            pa.array(quantile.astype(np.int8)), pa.array(["top", "quantile"])
        ).cast(pa.string()),
        "rank": np.where(quantile, rank - n_top, rank).astype(np.int16),
        "quantile_bin": pa.array(qbin, mask=~quantile),
        "context_id": rng.integers(0, p["n_contexts"], rows, dtype=np.int32),
        "max_pos": acts.argmax(1).astype(np.int16),
        "max_act": acts.max(1),
        "start": np.zeros(rows, np.int16),
        "acts": parquet.list_array(acts),
    }
    return parquet.table(columns, schema.EXAMPLES_SCHEMA)


def _write_chunked(path: Path, table_schema: pa.Schema, make, total: int, chunk: int, row_group: int) -> None:
    with pq.ParquetWriter(path, table_schema, compression="zstd", compression_level=1) as writer:
        for start in range(0, total, chunk):
            writer.write_table(make(start, min(chunk, total - start)), row_group_size=row_group)


def build_bench_store(path: str | Path, **params) -> Path:
    """Write the synthetic run (Parquet files, index, manifest) into ``path``, replacing what is there."""
    p = {**DEFAULTS, **params}
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = np.random.default_rng(p["seed"])
    n_tokens = p["n_contexts"] * p["width"]
    _write_chunked(staging / schema.FEATURES, schema.FEATURES_SCHEMA, lambda s, n: _features_chunk(rng, s, n, p, n_tokens),
                   p["n_features"], 100_000, 16_384)
    _write_chunked(staging / schema.EXAMPLES, schema.EXAMPLES_SCHEMA, lambda s, n: _examples_chunk(rng, s, n, p),
                   p["n_features"], 25_000, 8_192)
    writer = parquet.ContextWriter(staging / schema.CONTEXTS, group_rows=16_384)
    for start in range(0, p["n_contexts"], 16_384):
        n = min(16_384, p["n_contexts"] - start)
        writer.add(np.arange(start, start + n), rng.integers(0, p["vocab"], (n, p["width"])))
    writer.close()
    parquet.write_table(staging / schema.VOCAB, {"token_id": np.arange(p["vocab"], dtype=np.int32),
                                                "token": [f"w{i}" for i in range(p["vocab"])]}, schema.VOCAB_SCHEMA)
    n_rows = 2048
    token_cols: dict[str, np.ndarray] = {f.name: rng.random(n_rows).astype(np.float32) for f in schema.TOKENS_SCHEMA}
    token_cols.update(context_id=np.repeat(np.arange(0, n_rows // 63 + 1) * 10, 63)[:n_rows],
                      position=np.tile(np.arange(1, 64), n_rows // 63 + 1)[:n_rows],
                      token_id=rng.integers(0, p["vocab"], n_rows), l0=rng.integers(1, 100, n_rows))
    parquet.write_table(staging / schema.TOKENS, token_cols, schema.TOKENS_SCHEMA)
    save_file({"W": torch.zeros(8, 8), "b": torch.zeros(8), "w_norm": torch.zeros(8), "b_norm": torch.zeros(1)},
              str(staging / schema.DARK_MATTER))
    build_index(staging)
    manifest = {"schema_version": schema.SCHEMA_VERSION, "synthetic": p, "model": {"name": "synthetic"},
                "sae": {"d_sae": p["n_features"]}, "metrics": {"n_tokens": n_tokens}, "dark_matter": {}}
    (staging / schema.MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def ensure_bench_store(path: str | Path, **params) -> Path:
    """The cached synthetic store at ``path``, built first if missing or made with other parameters."""
    path = Path(path)
    want = {**DEFAULTS, **params}
    try:
        manifest = rundir.read_manifest(path)
    except ValueError:
        manifest = None
    if manifest is None or manifest.get("synthetic") != want or not (path / schema.INDEX).is_file():
        build_bench_store(path, **params)
    return path
