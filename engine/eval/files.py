"""Writing and reading the files of compare and evaluate (their names and schemas: ``schema``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..run.manifest import sections
from ..run.parquet import write_table
from . import schema


def write_folder(folder: Path, tables: dict[str, dict], info: dict) -> Path:
    """Write a comparison folder whole: the tables into ``<folder>.partial``, then ``comparison.json`` last,
    then swap it into place (an older folder is replaced)."""
    folder = Path(folder)
    with atomic.build_dir(folder) as staging:  # a unique folder aside: two writers never share one
        for name, columns in tables.items():
            write_table(staging / name, columns, schema.SCHEMAS[name])
        (staging / schema.COMPARISON).write_text(json.dumps(info, indent=2, default=_json_default, allow_nan=False))
    return folder


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in {schema.COMPARISON}")


def default_folder(narrow: Path, wide: Path, out: str | Path | None = None) -> Path:
    """Where the comparison of ``narrow`` with ``wide`` goes: ``<out>/<narrow name>--<wide name>`` when ``out`` is
    given, else ``<narrow>/compare/<wide name>``."""
    if out is not None:
        return Path(out) / f"{Path(narrow).name}--{Path(wide).name}"
    return Path(narrow) / schema.COMPARE_DIR / Path(wide).name


def find_comparison(a: str | Path, b: str | Path) -> tuple[Path, bool] | None:
    """A complete comparison folder of runs ``a`` and ``b`` and whether it has them swapped (B as its narrow
    side): looked for in each run's ``compare/`` folder and in ``compare/`` next to the runs; None if none."""
    a, b = Path(a), Path(b)
    for narrow, wide, swapped in ((a, b, False), (b, a, True)):
        for folder in (default_folder(narrow, wide), default_folder(narrow, wide, narrow.parent / schema.COMPARE_DIR)):
            if (folder / schema.COMPARISON).is_file():
                return folder, swapped
    return None


class Comparison:
    """A comparison folder, read: ``info`` (its ``comparison.json``) and its tables as Arrow tables."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / schema.COMPARISON
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no complete comparison (no {schema.COMPARISON})")
        self.info: dict = json.loads(path.read_text())

    def table(self, name: str) -> pa.Table:
        """``schema.MATCHES``, ``schema.MATCHES_B`` or ``schema.PAIRS``."""
        if name not in (schema.MATCHES, schema.MATCHES_B, schema.PAIRS):
            raise ValueError(f"no table {name!r} in a comparison")
        return pq.read_table(self.folder / name)

    def children(self, a_id: int) -> pa.Table:
        """The candidate pairs of latent ``a_id`` of A (children first, then by cosine)."""
        pairs = pq.read_table(self.folder / schema.PAIRS, filters=[("a_id", "=", int(a_id))])
        return pairs.sort_by([("child", "descending"), ("cos", "descending")])

    def match(self, a_id: int) -> dict | None:
        """The ``matches.parquet`` row of latent ``a_id`` of A, or None."""
        rows = pq.read_table(self.folder / schema.MATCHES, filters=[("a_id", "=", int(a_id))]).to_pylist()
        return rows[0] if rows else None

    def match_b(self, b_id: int) -> dict | None:
        """The ``matches_b.parquet`` row of latent ``b_id`` of B, or None."""
        rows = pq.read_table(self.folder / schema.MATCHES_B, filters=[("b_id", "=", int(b_id))]).to_pylist()
        return rows[0] if rows else None

    def parents(self, b_id: int) -> pa.Table:
        """The candidate pairs of latent ``b_id`` of B (the latents of A it may split; children first)."""
        pairs = pq.read_table(self.folder / schema.PAIRS, filters=[("b_id", "=", int(b_id))])
        return pairs.sort_by([("child", "descending"), ("cos", "descending")])


def write_evaluation(run_dir: str | Path, columns: dict[str, list], meta: dict) -> Path:
    """Write ``<run>/evaluation.parquet`` (replacing an older one atomically); ``meta`` goes in its metadata."""
    from ..run.parquet import table

    path = Path(run_dir) / schema.EVALUATION
    data = table(columns, schema.EVALUATION_SCHEMA)
    data = data.replace_schema_metadata({schema.EVALUATION_META: json.dumps(meta, default=_json_default).encode()})
    atomic.remove_stale(path.parent, (path.name,))  # a killed evaluate's (the caller holds the lock)
    return atomic.write_file(path, lambda tmp: pq.write_table(data, tmp, compression="zstd"))


def summary_key(group: str, metric: str, k: int | None) -> str:
    """``group/metric`` or ``group/metric@k``: how a whole-group result is named in summaries."""
    return f"{group}/{metric}" + (f"@{k}" if k is not None else "")


def evaluation_summary(run_dir: str | Path, manifest: dict | None = None) -> tuple[dict[str, float], dict, bool] | None:
    """The run's whole-group results (``summary_key`` -> value), the file's metadata and whether it is stale (it
    was computed for another SAE or another computation of the run than ``manifest`` describes); None if none."""
    found = read_evaluation(run_dir)
    if found is None:
        return None
    table, meta = found
    values = {summary_key(r["group"], r["metric"], r["k"]): r["value"] for r in table.to_pylist() if r["task"] is None}
    stale = False
    if manifest is not None:
        stale = meta.get("sae_hash") != sections(manifest).sae.hash or meta.get("created") != manifest.get("created")
    return values, meta, stale


def read_evaluation(run_dir: str | Path) -> tuple[pa.Table, dict] | None:
    """The run's evaluation rows and their metadata (settings, hashes, timings), or None when it has none."""
    path = Path(run_dir) / schema.EVALUATION
    if not path.is_file():
        return None
    data = pq.read_table(path)
    raw = (data.schema.metadata or {}).get(schema.EVALUATION_META)
    return data, (json.loads(raw) if raw else {})
