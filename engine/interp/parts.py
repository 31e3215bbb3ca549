"""Where explanations, scores and explanation embeddings live in a run directory, and how batches become files
(docs/run-format.md)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import atomic
from . import schema


def parts_dir(run_dir: Path) -> Path:
    return Path(run_dir) / schema.INTERP_DIR / "parts"


def write_part(run_dir: Path, tables: dict[str, pa.Table]) -> Path:
    """One batch's rows as a part folder, renamed into place once every file is written."""
    parts = parts_dir(run_dir)
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, table in tables.items():
            pq.write_table(table.cast(schema.FILES[name]), tmp / name, compression="zstd")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Claim the next number: rename fails on a folder another writer (the app's live explain beside a running
    # `saescope explain`) took meanwhile, because a part folder is never empty; then take the next one.
    atomic.fsync_tree(tmp)
    for _ in range(1000):
        existing = [p.name for p in part_folders(run_dir)]
        final = parts / f"{int(existing[-1]) + 1 if existing else 0:08d}"
        try:
            os.rename(tmp, final)
            atomic.fsync_dir(parts)
            return final
        except OSError:
            if not final.exists():
                raise
    raise RuntimeError(f"could not claim a part number in {parts}")


def part_folders(run_dir: Path) -> list[Path]:
    """Finished part folders in write order. A ``.tmp-*`` folder is never listed (nor removed here: it may be a
    batch another process is writing right now); ``consolidate`` removes those a killed writer left."""
    parts = parts_dir(run_dir)
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_all(run_dir: Path, name: str) -> pa.Table:
    """Every row of one kind: the consolidated file, then the parts in order, deduplicated (newest kept)."""
    tables = []
    if (Path(run_dir) / name).is_file():
        tables.append(pq.read_table(Path(run_dir) / name).cast(schema.FILES[name]))
    for part in part_folders(run_dir):
        if (part / name).is_file():
            tables.append(pq.read_table(part / name).cast(schema.FILES[name]))
    if not tables:
        return schema.FILES[name].empty_table()
    table = pa.concat_tables(tables)
    return _dedupe(table, schema.KEYS[name])


def _dedupe(table: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """The last row of each key, in key order."""
    if table.num_rows == 0:
        return table
    table = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by(list(keys), use_threads=False).aggregate([("_row", "max")])
    keep = pc.is_in(table["_row"], value_set=last["_row_max"])  # pyright: ignore[reportAttributeAccessIssue]  (pyarrow.compute's functions are generated at import)
    out = table.filter(keep).drop_columns(["_row"])
    return out.sort_by([(k, "ascending") for k in keys])


STALE_TMP_SECONDS = 3600


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that named ``.tmp-<pid>-<hex>`` may still be writing it (another process on this host,
    alive); an unnamed or foreign one counts as alive for an hour after its last change."""
    pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
    if pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return time.time() - tmp.stat().st_mtime < STALE_TMP_SECONDS
    except OSError:
        return False


def consolidate(run_dir: Path) -> dict[str, int]:
    """Fold the parts into the run's three files (atomically each) and remove them; returns row counts."""
    run_dir = Path(run_dir)
    if parts_dir(run_dir).is_dir():
        for leftover in parts_dir(run_dir).glob(".tmp-*"):  # batches a killed writer left half-written
            if not _writer_alive(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    atomic.remove_stale(run_dir, tuple(schema.FILES))  # a killed explain's (explain holds its lock)
    folders = part_folders(run_dir)
    counts = {}
    for name, file_schema in schema.FILES.items():
        table = read_all(run_dir, name)
        counts[name] = table.num_rows
        if not folders and (run_dir / name).is_file():
            continue
        if table.num_rows == 0 and not (run_dir / name).is_file():
            continue
        atomic.write_file(run_dir / name, lambda tmp, table=table, file_schema=file_schema: pq.write_table(
            table.cast(file_schema), tmp, compression="zstd", row_group_size=65536))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return counts
