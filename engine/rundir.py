"""A run directory's life: identity checks, a private staging folder, Parquet writers, and the final swap.

Files are written into ``<run>/.partial/`` and moved into place only at the end, after the old
manifest (if any) is removed; ``manifest.json`` is written last, atomically. A run killed at any
point therefore leaves no manifest (or the previous complete run untouched), and a rerun into the
same directory starts over cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import schema

PARTIAL = ".partial"
RUN_FILES = (
    schema.FEATURES, schema.EXAMPLES, schema.CONTEXTS, schema.VOCAB, schema.TOKENS, schema.DARK_MATTER, schema.INDEX,
)


def fingerprint(config: dict, tensors: Iterable[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """SHA-256 (16 hex digits) of a config and, per tensor, its name, shape and a strided sample of values.

    Sampling keeps this fast for multi-GB models; values are hashed as bfloat16 so the same weights
    loaded in another dtype usually hash alike.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.bfloat16).view(torch.int16).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(lm) -> str:
    """Fingerprint of a loaded model's config and weights."""
    config = lm.config.to_dict()
    for key in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        config.pop(key, None)
    return fingerprint(config, lm.model.named_parameters())


def sae_fingerprint(sae) -> str:
    """Fingerprint of an SAE's config and weights."""
    config = {k: v for k, v in sae.cfg.to_saelens_dict().items() if k not in ("dtype", "device")}
    return fingerprint(config, sae.named_parameters())


def read_manifest(run_dir: str | Path) -> dict | None:
    """The run's manifest, or None when the directory holds no complete run."""
    path = Path(run_dir) / schema.MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def prepare(out: str | Path, *, model_hash: str, sae_hash: str, force: bool) -> Path:
    """Check ``out`` may take this run, and return a fresh staging folder inside it.

    Refused without ``force``: a complete run of another model or SAE, or a directory holding
    files that are not a saescope run. A run without manifest (killed) is simply started over.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"run directory {out} exists and is not a directory")
    if out.is_dir() and not force:
        manifest = read_manifest(out)
        if manifest is not None:
            old_model, old_sae = manifest.get("model", {}), manifest.get("sae", {})
            if old_model.get("hash") != model_hash or old_sae.get("hash") != sae_hash:
                raise FileExistsError(
                    f"run directory {out} holds a run of model {old_model.get('name')!r} with SAE "
                    f"{old_sae.get('path') or old_sae.get('hash')!r}, not this model and SAE; "
                    "pass --force (force=True) to replace it, or choose another --out"
                )
        else:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in (*RUN_FILES, PARTIAL, schema.MANIFEST))
            if foreign:
                raise FileExistsError(
                    f"run directory {out} holds files that are not a saescope run ({', '.join(foreign[:5])}); "
                    "pass --force (force=True) to write the run there anyway, or choose another --out"
                )
    staging = out / PARTIAL
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finalize(out: str | Path, staging: Path, manifest: dict) -> None:
    """Move the staged files into ``out`` (old run files removed) and write the manifest last."""
    out = Path(out)
    (out / schema.MANIFEST).unlink(missing_ok=True)
    for name in RUN_FILES:
        if not (staging / name).exists():
            (out / name).unlink(missing_ok=True)
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    tmp = out / f".{schema.MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(_finite(manifest), f, indent=2, default=_json_default, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / schema.MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)


def _finite(value):
    """NaN and infinities (e.g. R^2 with no held-out tokens) become null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")


def list_array(values: np.ndarray, offsets: np.ndarray | None = None, pa_type=pa.float32()) -> pa.Array:
    """A Parquet list column from a ``[rows, width]`` array, or flat values plus ``offsets``."""
    if offsets is None:
        rows, width = values.shape
        offsets = np.arange(0, rows * width + 1, width, dtype=np.int64)
    offsets = offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)
    cls = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    return cls.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), type=pa_type))


def ragged_list_array(rows: list[np.ndarray], pa_type) -> pa.Array:
    """A list column from rows of different lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(rows) if rows else np.zeros(0)
    return list_array(flat, offsets, pa_type)


def table(columns: dict[str, pa.Array | np.ndarray | list], table_schema: pa.Schema) -> pa.Table:
    """An Arrow table whose columns follow ``table_schema`` exactly (values cast to the schema's types)."""
    arrays = []
    for field in table_schema:
        value = columns[field.name]
        arrays.append(value.cast(field.type) if isinstance(value, pa.Array) else pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=table_schema)


def write_table(path: Path, columns: dict[str, pa.Array | np.ndarray | list], table_schema: pa.Schema, row_group_size: int = 65536) -> int:
    """Write one Parquet file whose columns follow ``table_schema`` exactly; returns the row count."""
    data = table(columns, table_schema)
    pq.write_table(data, path, compression="zstd", row_group_size=row_group_size)
    return data.num_rows


class ContextWriter:
    """Streams ``contexts.parquet`` (context_id, token_ids) in row groups, so memory stays flat."""

    def __init__(self, path: Path, group_rows: int = 4096):
        self.path, self.group_rows = path, group_rows
        self.writer = pq.ParquetWriter(path, schema.CONTEXTS_SCHEMA, compression="zstd")
        self.ids: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.rows = 0

    def add(self, context_ids: np.ndarray, token_ids: np.ndarray) -> None:
        self.ids.append(context_ids.astype(np.int32))
        self.tokens.append(token_ids.astype(np.int32))
        self.rows += len(context_ids)
        if sum(len(i) for i in self.ids) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.ids:
            return
        ids, tokens = np.concatenate(self.ids), np.concatenate(self.tokens)
        table = pa.Table.from_arrays([pa.array(ids), list_array(tokens, pa_type=pa.int32())], schema=schema.CONTEXTS_SCHEMA)
        self.writer.write_table(table)
        self.ids, self.tokens = [], []

    def close(self) -> int:
        self._flush()
        self.writer.close()
        return self.rows


def read_context_tokens(path: Path, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the contexts ``wanted`` (streamed, so only those rows are held): sorted ids, ``[n, pos]``."""
    wanted = np.unique(wanted)
    ids_out, tokens_out = [], []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        ids = batch.column("context_id").to_numpy()
        keep = np.isin(ids, wanted)
        if keep.any():
            lists = batch.column("token_ids").filter(pa.array(keep))
            width = len(lists[0]) if len(lists) else 0
            tokens_out.append(lists.flatten().to_numpy().reshape(-1, width))
            ids_out.append(ids[keep])
    if not ids_out:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int32)
    ids, tokens = np.concatenate(ids_out), np.concatenate(tokens_out)
    order = np.argsort(ids)
    return ids[order], tokens[order]
