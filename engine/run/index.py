"""The run's DuckDB index: tables loaded from its Parquet files (sorted for the query layer), built atomically."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from .. import atomic
from . import schema, sql


@contextmanager
def building(target: Path, *, copy_of: Path | None = None) -> Generator[duckdb.DuckDBPyConnection]:
    """A connection to a fresh DuckDB file beside ``target`` (or to a copy of the database ``copy_of``, to be
    changed), checkpointed and renamed onto it when the block ends normally and removed (with its WAL) when it
    raises: readers only ever see a whole database, and one open on the old file keeps reading it."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if copy_of is not None:
            shutil.copyfile(copy_of, tmp)
        con = duckdb.connect(str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        con.execute(sql.NO_PROGRESS_BAR)
        yield con
        con.execute(sql.CHECKPOINT)
        con.close()
        atomic.fsync_file(tmp)
        os.replace(tmp, target)
        atomic.fsync_dir(target.parent)
    except BaseException as err:
        con.close()
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
        if isinstance(err, duckdb.Error) and "No space left on device" in str(err):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {target.name} in {target.parent}") from err
        raise


def build_index(run_dir: str | Path, target: str | Path | None = None) -> Path:
    """Load the run's Parquet files into a DuckDB file (default ``<run>/index.duckdb``), atomically."""
    run_dir = Path(run_dir)
    target = Path(target) if target else run_dir / schema.INDEX
    with building(target) as con:
        for table, (name, table_schema) in sql.TABLES.items():
            source = {"path": str(run_dir / name)}
            if not (run_dir / name).is_file():
                if name in schema.OPTIONAL_FILES:  # a run written before the file existed
                    con.execute(sql.create_empty_statement(table))
                    continue
                raise FileNotFoundError(f"run directory {run_dir} lacks {name}")
            present = tuple(pq.read_schema(run_dir / name).names)
            missing = tuple(c for c in table_schema.names if c not in present)
            if any(c not in schema.OPTIONAL_COLUMNS.get(name, ()) for c in missing):
                raise ValueError(f"{run_dir / name} lacks columns {', '.join(missing)}: not a saescope run file")
            fixed = {}
            if sql.list_columns(table, present):
                widths = con.execute(sql.list_widths_statement(table, present), source).fetchone()
                assert widths is not None  # an aggregate query returns one row
                for i, (column, _) in enumerate(sql.list_columns(table, present)):
                    lo, hi = widths[2 * i], widths[2 * i + 1]
                    if lo is not None and lo == hi and lo > 0:
                        fixed[column] = lo
            con.execute(sql.build_statement(table, fixed, missing), source)
        for statement in dict.fromkeys(sql.BUILD_ORDERED.values()):
            con.execute(statement)
        con.execute(sql.INDEX_VERSION_WRITE, {"version": sql.INDEX_VERSION})
    return target


READ_THREADS = 1
"""Point lookups and pre-sorted scans gain nothing from DuckDB's worker threads, and waking them costs tail
latency (feature page p95 14 -> 10 ms at 1M latents on 2 cores); concurrent sessions run in parallel anyway."""


ATTACHED = "db"


def open_read_only(path: Path, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the DuckDB file at ``path`` as it is now, with file access then switched off (and
    its memory capped at ``memory_limit``, a DuckDB size such as ``1GB``, when given).

    Not ``duckdb.connect(path)``: DuckDB shares one database instance per path within a process, so a file rebuilt
    and renamed into place (``building``) while an older connection to it is still open would be read through the
    old instance, stale. A fresh in-memory instance with the file attached always reads the file there now. Take
    cursors with ``cursor``: each must be pointed at the attached database."""
    limit = {} if memory_limit is None else {"memory_limit": memory_limit}
    con = duckdb.connect(config={"threads": READ_THREADS, **limit})
    try:
        con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS {ATTACHED} (READ_ONLY)")
        con.execute(f"USE {ATTACHED}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of an ``open_read_only`` connection (one per call: cursors make a connection thread-safe)."""
    cur = con.cursor()
    cur.execute(f"USE {ATTACHED}")
    return cur


def index_current(index: Path) -> bool:
    if not index.is_file():
        return False
    try:
        with open_read_only(index) as con:
            row = con.execute(sql.INDEX_VERSION_READ).fetchone()
            assert row is not None  # an aggregate query returns one row
            return row[0] == sql.INDEX_VERSION
    except duckdb.Error:
        return False
