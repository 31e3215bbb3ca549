"""Corpora stored as tables: local Parquet/Arrow files and Hugging Face datasets (``hf:NAME[:split][:column]``).

A table corpus is one column of a table: a text column (each row a document, tokenized by the caller) or a
token-id column (``input_ids`` / ``tokens``: each row a list of ids, used exactly as stored). Local files are read
with pyarrow alone; a dataset on the Hugging Face hub streams through the optional ``datasets`` package
(``pip install 'saescope[hf]'``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")
TEXT_COLUMNS = ("text",)
TOKEN_COLUMNS = ("input_ids", "tokens")
BATCH_ROWS = 1024
HF_EXTRA = "pip install 'saescope[hf]'"


class TableSpec(NamedTuple):
    """Where a table corpus is and which part of it to read."""

    name: str
    """Hub dataset name (``owner/name``) or a local file/directory."""
    split: str | None
    """Split to read (hub default ``train``); for a local directory, a sub-directory or file-name prefix."""
    column: str | None
    """Column to read; None picks the first of ``text``, ``input_ids``, ``tokens`` the table has."""
    hub: bool
    """True for a hub dataset (needs ``datasets``), False for local Parquet/Arrow files."""


class Column(NamedTuple):
    """The column a corpus reads and what it holds."""

    name: str
    kind: str
    """``text`` (documents to tokenize) or ``tokens`` (lists of token ids, used as stored)."""


def _has_tables(path: Path) -> bool:
    return any(p.is_file() and p.name.endswith(TABLE_SUFFIXES) for p in path.rglob("*"))


def parse_spec(spec: str | Path, text_suffixes: tuple[str, ...] = ()) -> TableSpec | None:
    """The table corpus ``spec`` names, or None for a text corpus (``.txt``/``.jsonl`` files)."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX):].split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"corpus {text!r}: expected hf:NAME[:split][:column], e.g. hf:NeelNanda/pile-10k:train:text")
        name, split, column = (parts + ["", ""])[:3]
        return TableSpec(name, split or None, column or None, hub=not Path(name).exists())
    path = Path(spec)
    if path.is_file() and path.name.endswith(TABLE_SUFFIXES):
        return TableSpec(str(path), None, None, hub=False)
    if path.is_dir() and _has_tables(path):
        if any(p.is_file() and p.name.endswith(text_suffixes) for p in path.rglob("*")):
            raise ValueError(f"corpus directory {path} mixes text files and Parquet/Arrow tables: point at one kind")
        return TableSpec(str(path), None, None, hub=False)
    return None


def describe(spec: TableSpec) -> str:
    """``spec`` as the user would write it."""
    extra = f":{spec.split or ''}:{spec.column}" if spec.column else (f":{spec.split}" if spec.split else "")
    return f"{HF_PREFIX}{spec.name}{extra}"


def local_files(spec: TableSpec) -> list[Path]:
    """The Parquet/Arrow files of a local table corpus, in a stable order (the split's, when one is named)."""
    path = Path(spec.name)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist")
    if path.is_file():
        if not path.name.endswith(TABLE_SUFFIXES):
            raise ValueError(f"corpus file {path} must end with one of {', '.join(TABLE_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TABLE_SUFFIXES))
    splits = sorted(p.name for p in path.iterdir() if p.is_dir() and _has_tables(p))
    split = spec.split
    if split is None and (path / "dataset_dict.json").is_file():  # a datasets save_to_disk DatasetDict
        if "train" not in splits:
            raise ValueError(f"corpus {path} holds several splits ({', '.join(splits)}): name one, e.g. hf:{path}:{splits[0]}")
        split = "train"
    if split is not None:
        chosen = [p for p in files if split in p.relative_to(path).parts[:-1] or p.name.startswith((f"{split}-", f"{split}."))]
        if not chosen:
            raise ValueError(f"corpus {path} has no split {split!r} (sub-directories: {', '.join(splits) or 'none'})")
        files = chosen
    if not files:
        raise ValueError(f"corpus directory {path} holds no {', '.join(TABLE_SUFFIXES)} files")
    return files


def _open_arrow(path: Path) -> pa.RecordBatchReader | pa.ipc.RecordBatchFileReader:
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)  # Arrow IPC file format
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)  # the stream format datasets writes (save_to_disk, its cache)


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(str(path)) if path.name.endswith(".parquet") else _open_arrow(path).schema
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path} is not a readable {path.suffix[1:]} file: {err}") from err


def _batches(path: Path, column: str) -> Iterator[pa.Array]:
    if path.name.endswith(".parquet"):
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            yield batch.column(0)
        return
    reader = _open_arrow(path)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if isinstance(
        reader, pa.ipc.RecordBatchFileReader) else reader
    for batch in batches:
        yield batch.column(column)


def pick_column(schema_types: dict[str, pa.DataType], spec: TableSpec) -> Column:
    """The column to read, checked: present, and text or a list of integers."""
    where = describe(spec)
    if spec.column is None:
        name = next((c for c in TEXT_COLUMNS + TOKEN_COLUMNS if c in schema_types), None)
        if name is None:
            raise ValueError(f"corpus {where} has no text, input_ids or tokens column (columns: {', '.join(schema_types)}); "
                             f"name one: {describe(spec._replace(column='COLUMN'))}")
    else:
        name = spec.column
        if name not in schema_types:
            raise ValueError(f"corpus {where} has no column {name!r} (columns: {', '.join(schema_types)})")
    kind_of = schema_types[name]
    if pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of):
        return Column(name, "text")
    is_list = pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of) or pa.types.is_fixed_size_list(kind_of)
    if is_list and pa.types.is_integer(kind_of.value_type):
        return Column(name, "tokens")
    raise ValueError(f"corpus {where}: column {name!r} holds {kind_of}, expected text (string) or token ids (list of integers)")


def _local_stream(spec: TableSpec) -> tuple[Column, Iterator[pa.Array]]:
    files = local_files(spec)
    schemas = [_schema(f) for f in files]
    column = pick_column({f.name: f.type for f in schemas[0]}, spec)
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        if pick_column({f.name: f.type for f in schema}, spec._replace(column=column.name)) != column:
            raise ValueError(f"corpus {describe(spec)}: column {column.name!r} of {file} does not hold {column.kind} "
                             f"as in {files[0]}")
    return column, (array for file in files for array in _batches(file, column.name))


def _hub_stream(spec: TableSpec) -> tuple[Column, Iterator[pa.Array]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"corpus {describe(spec)}: Hugging Face datasets need the 'datasets' package: {HF_EXTRA} "
                         "(local Parquet/Arrow files need nothing extra)") from None
    split = spec.split or "train"
    _check_hub_reachable(spec, datasets)
    try:
        ds = datasets.load_dataset(spec.name, split=split, streaming=True)
    except Exception as err:  # datasets raises many kinds: not found, offline, bad split, no connection
        raise ValueError(f"cannot open Hugging Face dataset {spec.name!r} (split {split!r}): {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    tables = cast(Iterator[pa.Table], ds.with_format("arrow").iter(batch_size=BATCH_ROWS))
    if ds.features is not None:
        types = {f.name: f.type for f in ds.features.arrow_schema}
        first = None
    else:  # features unknown until the first rows arrive
        first = next(tables, None)
        if first is None:
            raise ValueError(f"corpus {describe(spec)} is empty")
        types = {f.name: f.type for f in first.schema}
    column = pick_column(types, spec)

    def arrays() -> Iterator[pa.Array]:
        if first is not None:
            yield pa.chunked_array(first.column(column.name)).combine_chunks()
        for table in tables:
            yield pa.chunked_array(table.column(column.name)).combine_chunks()

    return column, arrays()


def _check_hub_reachable(spec: TableSpec, datasets) -> None:
    """Fail at once when the hub cannot be reached (huggingface_hub would retry for ~25 s first)."""
    import os

    from huggingface_hub import constants

    from ..saes.releases import unreachable

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if Path(spec.name).exists() or datasets.config.HF_HUB_OFFLINE or offline:
        return  # a local folder, or offline: datasets answers from its cache (or says it cannot) at once
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    why = unreachable(endpoint)
    if why is not None:
        raise ValueError(f"cannot reach the Hugging Face hub at {endpoint} to stream dataset {spec.name!r} ({why}); "
                         "a local Parquet/Arrow copy works offline")


def open_stream(spec: TableSpec) -> tuple[Column, Iterator[pa.Array]]:
    """The chosen column and an iterator over its values in row order, batch by batch (checked before reading)."""
    return _hub_stream(spec) if spec.hub else _local_stream(spec)


def texts(spec: TableSpec, column: Column, arrays: Iterator[pa.Array]) -> Iterator[str]:
    """The documents of a text column (empty and null rows skipped)."""
    if column.kind != "text":
        raise ValueError(f"corpus {describe(spec)}: column {column.name!r} holds token ids, not text")
    for array in arrays:
        for text in array.to_pylist():
            if text:
                yield text


def token_rows(spec: TableSpec, column: Column, arrays: Iterator[pa.Array], vocab_size: int) -> Iterator[np.ndarray]:
    """Each row of a token-id column as int64, exactly as stored; ids outside ``[0, vocab_size)`` are an error."""
    row = 0
    if column.kind != "tokens":
        raise ValueError(f"corpus {describe(spec)}: column {column.name!r} holds text, not token ids")
    row = 0
    for array in arrays:
        # pyarrow.compute's functions are generated at import, unknown to type checkers
        flat = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)  # pyright: ignore[reportAttributeAccessIssue]
        lengths = pc.list_value_length(array).fill_null(0)  # pyright: ignore[reportAttributeAccessIssue]
        ends = np.cumsum(lengths.to_numpy(zero_copy_only=False))
        outside = np.flatnonzero((flat < 0) | (flat >= vocab_size))
        if len(outside):
            bad = int(flat[outside[0]])
            raise ValueError(
                f"corpus {describe(spec)}: row {row + int(np.searchsorted(ends, outside[0], side='right'))} of column "
                f"{column.name!r} holds token id {bad}, outside the tokenizer's vocabulary of {vocab_size} ids: "
                "the corpus was tokenized for another model")
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        start = 0
        for end, ok in zip(ends.tolist(), valid.tolist(), strict=True):
            if ok:
                yield flat[start:end]
            start = end
        row += len(array)


def table_hash(spec: TableSpec) -> str:
    """SHA-256 over the local files' names and bytes, or over the hub dataset's name, split and column."""
    digest = hashlib.sha256()
    if spec.hub:
        digest.update(json.dumps([spec.name, spec.split or "train", spec.column]).encode())
        return digest.hexdigest()[:16]
    for file in local_files(spec):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
