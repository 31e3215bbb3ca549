"""Building interp.duckdb from a run's explanation files (and the parts ``explain`` has not folded in yet): aside,
then renamed into place, keyed by a signature of every source file."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa

from ..run.index import building, open_read_only
from . import parts, schema, sql
from .rows import BASELINE_PREFIX


def _file_sig(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def source_state(run_dir: Path) -> list:
    """Name, size and mtime of every consolidated file, then of each part folder's files, in write order."""
    state: list = [_file_sig(run_dir / name) for name in schema.FILES if (run_dir / name).is_file()]
    for part in parts.part_folders(run_dir):
        state.append([part.name, [_file_sig(part / n) for n in schema.FILES if (part / n).is_file()]])
    return state


def _signature(state: list) -> str:
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32] if state else ""


def source_signature(run_dir: Path) -> str:
    """A hash of ``source_state``: changes whenever explain writes anything."""
    return _signature(source_state(run_dir))


def source_files(run_dir: Path, name: str) -> list[Path]:
    """The files holding rows of one kind, in write order: the consolidated file, then the parts."""
    files = [run_dir / name] if (run_dir / name).is_file() else []
    return files + [p / name for p in parts.part_folders(run_dir) if (p / name).is_file()]


def _load(con: duckdb.DuckDBPyConnection, table: str, files: list[Path], name: str, columns: list[str]) -> None:
    """One kind's rows into ``table``: deduplicated by key (the newest row kept), clustered by feature_id."""
    listed = ", ".join(columns)
    paths = [str(p) for p in files]
    if not paths:
        file_schema = schema.FILES[name]
        con.register("empty_source", pa.schema([file_schema.field(c) for c in columns]).empty_table())
        con.execute(sql.LOAD_EMPTY.format(table=table, columns=listed))
        con.unregister("empty_source")
    elif len(paths) == 1:
        con.execute(sql.LOAD_ONE.format(table=table, columns=listed), {"files": paths})
    else:
        con.execute(sql.LOAD_SUPERSEDED.format(keys=", ".join(schema.KEYS[name])), {"files": paths})
        con.execute(sql.LOAD_MANY.format(table=table, columns=listed), {"files": paths, "first": paths[:1], "rest": paths[1:]})
        con.execute(sql.DROP_SUPERSEDED)


def build_interp_db(run_dir: str | Path, target: str | Path | None = None) -> Path:
    """Load the run's explanation files and pending parts into ``interp.duckdb`` (default next to them), atomically.
    Raises ``duckdb.IOException`` when a part vanished while being read (explain consolidated it): try again."""
    run_dir = Path(run_dir)
    target = Path(target) if target else run_dir / sql.INTERP_DB
    state = source_state(run_dir)
    files = {name: source_files(run_dir, name) for name in schema.FILES}
    with building(target) as con:
        for table, name in _TABLES.items():
            _load(con, table, files[name], name, _columns(name))
        con.execute(sql.BUILD_EXPLANATIONS, {"baseline": BASELINE_PREFIX})
        con.execute(sql.CREATE_LOG)
        con.execute(sql.BUILD_INFO, {"version": sql.DB_VERSION, "signature": _signature(state),
                                     "sources": json.dumps(state)})
    return target


_TABLES = {"raw_explanations": schema.EXPLANATIONS, "scores": schema.SCORES, "embedded": schema.EMBEDDINGS}
"""The database's tables of source rows, and the file kind each is loaded from."""


def _columns(name: str) -> list[str]:
    if name == schema.EMBEDDINGS:  # the keys only: the vectors stay in Parquet (search reads them from there)
        return list(schema.KEYS[name])
    return [f.name for f in schema.FILES[name]]


def _new_parts(held: list, state: list) -> list[list] | None:
    """The part entries of ``state`` that come after those ``held`` has, or None when ``state`` is not ``held`` plus
    new parts (a consolidation, a rewritten file or a removed part: rebuild)."""
    if len(state) < len(held) or state[: len(held)] != held:
        return None
    new = state[len(held) :]
    return new if all(isinstance(entry[1], list) for entry in new) else None


def refresh_interp_db(run_dir: str | Path, target: str | Path) -> str:
    """Bring ``target`` up to date with the run's explanation files: ``"current"`` when it is, ``"applied"`` when
    only new part folders had to be added (on a copy of the database, renamed into place: the rows they rewrite
    replaced, the ranks of the latents they touch recomputed, those latents logged for the search index), else
    ``"built"`` (from scratch). Raises ``duckdb.IOException``/``FileNotFoundError`` when a part vanished meanwhile."""
    run_dir, target = Path(run_dir), Path(target)
    state = source_state(run_dir)
    held = db_state(target)
    if held is not None and held[0] == _signature(state):
        return "current"
    new = _new_parts(held[1], state) if held is not None else None
    if held is None or not new:
        build_interp_db(run_dir, target)
        return "built"
    try:
        _apply(run_dir, target, held[1], new, _signature(state), state)
    except _Changed:
        build_interp_db(run_dir, target)
        return "built"
    return "applied"


def _apply(run_dir: Path, target: Path, held: list, new: list[list], signature: str, state: list) -> None:
    folders = [parts.parts_dir(run_dir) / entry[0] for entry in new]
    with building(target, copy_of=target) as con:
        row = con.execute(sql.STATE).fetchone()
        if row is None or json.loads(row[2]) != held:  # another process replaced it between the reads: rebuild
            raise _Changed
        con.execute(sql.CREATE_TOUCHED)
        for table, name in _TABLES.items():
            files = [str(f / name) for f in folders if (f / name).is_file()]
            if not files:
                continue
            keys = schema.KEYS[name]
            columns = ", ".join(_columns(name))
            con.execute(sql.NEW_ROWS.format(columns=columns, keys=", ".join(keys)), {"files": files})
            match = " AND ".join(f"t.{k} IS NOT DISTINCT FROM n.{k}" for k in keys)
            for statement in sql.REPLACE_ROWS:
                con.execute(statement.format(table=table, columns=columns, match=match))
        con.execute(sql.DEDUPE_TOUCHED)
        con.execute(sql.REDO_TOUCHED[0])
        con.execute(sql.REDO_TOUCHED[1], {"baseline": BASELINE_PREFIX})
        con.execute(sql.LOG_TOUCHED, {"seq": int(row[4]) + 1, "signature": signature})
        con.execute(sql.UPDATE_INFO, {"signature": signature, "sources": json.dumps(state)})


class _Changed(Exception):
    """The database changed under an incremental refresh."""


def db_state(path: Path) -> tuple[str, list] | None:
    """The signature and source list a current-version ``interp.duckdb`` holds (None: none, or an older version)."""
    if not path.is_file():
        return None
    try:
        with open_read_only(path) as con:
            row = con.execute(sql.STATE).fetchone()
    except duckdb.Error:
        return None
    if not row or row[0] != sql.DB_VERSION:
        return None
    return str(row[1]), json.loads(row[2])


def fallback_dir(run_dir: Path) -> Path:
    """Where derived files of a read-only run directory go: one temp folder per run path (reused across opens)."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"saescope-interp-{digest}"
