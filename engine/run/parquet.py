"""Writing and reading the run's Parquet files: list columns, schema-exact tables, streamed contexts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema

_FLOAT32 = pa.float32()

# pyarrow ships no type information (no stubs, its classes live in a compiled module), so pyright sees pa.Array,
# pa.DataType, pa.Schema and pa.Table as Unknown: the signatures below that name them say which rule that trips.


def list_array(values: np.ndarray, offsets: np.ndarray | None = None, pa_type: pa.DataType = _FLOAT32) -> pa.Array:  # pyright: ignore[reportUnknownParameterType]
    """A Parquet list column from a ``[rows, width]`` array, or flat values plus ``offsets``."""
    if offsets is None:
        rows, width = values.shape
        offsets = np.arange(0, rows * width + 1, width, dtype=np.int64)
    offsets = offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)
    cls = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    return cls.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), type=pa_type))


def ragged_list_array(rows: list[np.ndarray], pa_type: pa.DataType) -> pa.Array:  # pyright: ignore[reportUnknownParameterType]
    """A list column from rows of different lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(rows) if rows else np.zeros(0)
    return list_array(flat, offsets, pa_type)


def table(columns: dict[str, pa.Array | np.ndarray | list[Any]], table_schema: pa.Schema) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]
    """An Arrow table whose columns follow ``table_schema`` exactly (values cast to the schema's types); optional
    columns (``schema.OPTIONAL_COLUMNS``) left out are nulls."""
    arrays = []
    optional = {name for names in schema.OPTIONAL_COLUMNS.values() for name in names}
    n_rows = len(next(iter(columns.values()))) if columns else 0
    for field in table_schema:
        if field.name not in columns and field.name in optional:
            arrays.append(pa.nulls(n_rows, field.type))
            continue
        value = columns[field.name]
        if isinstance(value, pa.Array):
            # pyarrow ships no type information, so isinstance cannot narrow the union for the checker
            arrays.append(cast(pa.Array, value).cast(field.type))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=table_schema)


def write_table(
    path: Path, columns: dict[str, pa.Array | np.ndarray | list[Any]], table_schema: pa.Schema, row_group_size: int = 65536  # pyright: ignore[reportUnknownParameterType]
) -> int:
    """Write one Parquet file whose columns follow ``table_schema`` exactly; returns the row count."""
    data = table(columns, table_schema)
    pq.write_table(data, path, compression="zstd", row_group_size=row_group_size)
    return data.num_rows


class ContextWriter:
    """Streams ``contexts.parquet`` (context_id, token_ids) in row groups, so memory stays flat.

    Rows go to part files next to ``path`` (``.<name>.parts/``); ``export(dest)`` writes every row so far to
    another file (a snapshot's copy) and ``close()`` joins the parts into ``path``.
    """

    def __init__(self, path: Path, group_rows: int = 4096):
        self.path, self.group_rows = Path(path), group_rows
        self.parts_dir = self.path.with_name(f".{self.path.name}.parts")
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(parents=True)
        self.parts: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
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
        if self.writer is None:
            self.parts.append(self.parts_dir / f"part-{len(self.parts):05d}.parquet")
            self.writer = pq.ParquetWriter(self.parts[-1], schema.CONTEXTS_SCHEMA, compression="zstd")
        self.writer.write_table(table)
        self.ids, self.tokens = [], []

    def _seal(self) -> None:
        """Flush the buffer and close the open part, so every row so far is in readable part files."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def export(self, dest: Path) -> None:
        """Write every context added so far to ``dest`` (one Parquet file); writing can go on afterwards."""
        self._seal()
        with pq.ParquetWriter(dest, schema.CONTEXTS_SCHEMA, compression="zstd") as writer:
            for part in self.parts:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=self.group_rows):
                    writer.write_batch(batch)
            if not self.parts:
                writer.write_table(schema.CONTEXTS_SCHEMA.empty_table())

    def close(self) -> int:
        """Join the parts into ``path`` (a single part is renamed, not copied) and remove them."""
        self._seal()
        if len(self.parts) == 1:
            os.replace(self.parts[0], self.path)
        else:
            self.export(self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
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
