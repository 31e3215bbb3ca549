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


def source_signature(run_dir: Path) -> str:
    """Name, size and mtime of every consolidated file and part file: changes whenever explain writes anything."""
    sig: list = []
    for name in schema.FILES:
        if (run_dir / name).is_file():
            sig.append(_file_sig(run_dir / name))
    for part in parts.part_folders(run_dir):
        sig.append([part.name, [_file_sig(part / n) for n in schema.FILES if (part / n).is_file()]])
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32] if sig else ""


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
    signature = source_signature(run_dir)
    files = {name: source_files(run_dir, name) for name in schema.FILES}
    with building(target) as con:
        _load(con, "raw_explanations", files[schema.EXPLANATIONS], schema.EXPLANATIONS,
              [f.name for f in schema.EXPLANATIONS_SCHEMA])
        _load(con, "scores", files[schema.SCORES], schema.SCORES, [f.name for f in schema.SCORES_SCHEMA])
        _load(con, "embedded", files[schema.EMBEDDINGS], schema.EMBEDDINGS,
              ["feature_id", "explainer", "prompt_version", "model"])
        con.execute(sql.BUILD_EXPLANATIONS, {"baseline": BASELINE_PREFIX})
        con.execute(sql.DROP_RAW)
        con.execute(sql.BUILD_INFO, {"version": sql.DB_VERSION, "signature": signature})
    return target


def db_signature(path: Path) -> tuple[int, str] | None:
    if not path.is_file():
        return None
    try:
        with open_read_only(path) as con:
            row = con.execute(sql.INFO).fetchone()
    except duckdb.Error:
        return None
    return (int(row[0]), str(row[1])) if row and row[0] is not None else None


def fallback_dir(run_dir: Path) -> Path:
    """Where derived files of a read-only run directory go: one temp folder per run path (reused across opens)."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"saescope-interp-{digest}"
