"""The files ``compare`` and ``evaluate`` write: names, Arrow schemas, writers and readers (docs/run-format.md).

A comparison of runs A (the narrower SAE) and B lives in one folder, by default ``<A>/compare/<name of B>/``:
``matches.parquet`` (a row per latent of A), ``matches_b.parquet`` (a row per latent of B), ``pairs.parquet``
(the split-candidate pairs) and ``comparison.json``, written last (a folder without it is incomplete). Three
runs or more also give ``widths.parquet`` (one row per run). ``evaluate`` writes ``<RUN>/evaluation.parquet``:
one row per (group, metric, task, k), with the settings in the file's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..run.parquet import write_table

COMPARE_DIR = "compare"
COMPARISON = "comparison.json"
MATCHES = "matches.parquet"
MATCHES_B = "matches_b.parquet"
PAIRS = "pairs.parquet"
WIDTHS = "widths.parquet"
EVALUATION = "evaluation.parquet"
EVALUATION_META = b"saescope.evaluation"

MATCHES_SCHEMA = pa.schema([
    ("a_id", pa.int32()),
    ("best_b", pa.int32()),  # the latent of B with the most similar decoder row
    ("best_cos", pa.float32()),
    ("second_b", pa.int32()),
    ("second_cos", pa.float32()),
    ("partner_b", pa.int32()),  # one-to-one assignment; null: unmatched
    ("partner_cos", pa.float32()),
    ("best_corr", pa.float32()),  # activation correlation over the sample; null where a latent never fired
    ("partner_corr", pa.float32()),
    ("a_fires", pa.int64()),  # sample tokens where the latent fires
    ("n_children", pa.int16()),  # split children in B (>= 2: split)
])
MATCHES_B_SCHEMA = pa.schema([
    ("b_id", pa.int32()),
    ("best_a", pa.int32()),
    ("best_cos", pa.float32()),
    ("partner_a", pa.int32()),  # null: no latent of A was assigned to it
    ("b_fires", pa.int64()),
])
PAIRS_SCHEMA = pa.schema([
    ("a_id", pa.int32()),
    ("b_id", pa.int32()),
    ("cos", pa.float32()),
    ("corr", pa.float32()),
    ("n_both", pa.int64()),  # sample tokens where both fire
    ("a_fires", pa.int64()),
    ("b_fires", pa.int64()),
    ("p_a_given_b", pa.float32()),  # n_both / b_fires
    ("p_b_given_a", pa.float32()),  # n_both / a_fires
    ("child", pa.bool_()),
])
WIDTHS_SCHEMA = pa.schema([
    ("run", pa.string()),
    ("d_sae", pa.int64()),
    ("architecture", pa.string()),
    ("k", pa.int32()),
    ("n_tokens", pa.int64()),
    ("l0", pa.float64()),
    ("explained_variance", pa.float64()),
    ("ce_loss_recovered", pa.float64()),
    ("kl_div", pa.float64()),
    ("dead_fraction", pa.float64()),
    ("dense_fraction", pa.float64()),
    ("dm_error_r2", pa.float64()),
    ("dm_norm_r2", pa.float64()),
])
EVALUATION_SCHEMA = pa.schema([
    ("group", pa.string()),  # core, sparse_probing, absorption
    ("metric", pa.string()),
    ("task", pa.string()),  # a probing task, a letter, or null for the whole group
    ("k", pa.int32()),  # latents the metric uses (k-sparse probes); null otherwise
    ("value", pa.float64()),
    ("n", pa.int64()),  # samples behind the value (tokens, test texts, words); null if not one count
    ("latents", pa.list_(pa.int32())),  # the latents a k-sparse probe used (or a letter's main latents)
])


SCHEMAS = {MATCHES: MATCHES_SCHEMA, MATCHES_B: MATCHES_B_SCHEMA, PAIRS: PAIRS_SCHEMA}


def write_folder(folder: Path, tables: dict[str, dict], info: dict) -> Path:
    """Write a comparison folder whole: the tables into ``<folder>.partial``, then ``comparison.json`` last,
    then swap it into place (an older folder is replaced)."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, columns in tables.items():
        write_table(staging / name, columns, SCHEMAS[name])
    (staging / COMPARISON).write_text(json.dumps(info, indent=2, default=_json_default, allow_nan=False))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in {COMPARISON}")


def default_folder(narrow: Path, wide: Path, out: str | Path | None = None) -> Path:
    """Where the comparison of ``narrow`` with ``wide`` goes: ``<out>/<narrow name>--<wide name>`` when ``out`` is
    given, else ``<narrow>/compare/<wide name>``."""
    if out is not None:
        return Path(out) / f"{Path(narrow).name}--{Path(wide).name}"
    return Path(narrow) / COMPARE_DIR / Path(wide).name


def find_comparison(a: str | Path, b: str | Path) -> tuple[Path, bool] | None:
    """A complete comparison folder of runs ``a`` and ``b`` and whether it has them swapped (B as its narrow
    side): looked for in each run's ``compare/`` folder and in ``compare/`` next to the runs; None if none."""
    a, b = Path(a), Path(b)
    for narrow, wide, swapped in ((a, b, False), (b, a, True)):
        for folder in (default_folder(narrow, wide), default_folder(narrow, wide, narrow.parent / COMPARE_DIR)):
            if (folder / COMPARISON).is_file():
                return folder, swapped
    return None


class Comparison:
    """A comparison folder, read: ``info`` (its ``comparison.json``) and its tables as Arrow tables."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / COMPARISON
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no complete comparison (no {COMPARISON})")
        self.info: dict = json.loads(path.read_text())

    def table(self, name: str) -> pa.Table:
        """``MATCHES``, ``MATCHES_B`` or ``PAIRS``."""
        if name not in (MATCHES, MATCHES_B, PAIRS):
            raise ValueError(f"no table {name!r} in a comparison")
        return pq.read_table(self.folder / name)

    def children(self, a_id: int) -> pa.Table:
        """The candidate pairs of latent ``a_id`` of A (children first, then by cosine)."""
        pairs = pq.read_table(self.folder / PAIRS, filters=[("a_id", "=", int(a_id))])
        return pairs.sort_by([("child", "descending"), ("cos", "descending")])

    def match(self, a_id: int) -> dict | None:
        """The ``matches.parquet`` row of latent ``a_id`` of A, or None."""
        rows = pq.read_table(self.folder / MATCHES, filters=[("a_id", "=", int(a_id))]).to_pylist()
        return rows[0] if rows else None

    def match_b(self, b_id: int) -> dict | None:
        """The ``matches_b.parquet`` row of latent ``b_id`` of B, or None."""
        rows = pq.read_table(self.folder / MATCHES_B, filters=[("b_id", "=", int(b_id))]).to_pylist()
        return rows[0] if rows else None

    def parents(self, b_id: int) -> pa.Table:
        """The candidate pairs of latent ``b_id`` of B (the latents of A it may split; children first)."""
        pairs = pq.read_table(self.folder / PAIRS, filters=[("b_id", "=", int(b_id))])
        return pairs.sort_by([("child", "descending"), ("cos", "descending")])


def write_evaluation(run_dir: str | Path, columns: dict[str, list], meta: dict) -> Path:
    """Write ``<run>/evaluation.parquet`` (replacing an older one atomically); ``meta`` goes in its metadata."""
    from ..run.parquet import table

    path = Path(run_dir) / EVALUATION
    data = table(columns, EVALUATION_SCHEMA)
    data = data.replace_schema_metadata({EVALUATION_META: json.dumps(meta, default=_json_default).encode()})
    tmp = path.with_name(f".{EVALUATION}.tmp")
    pq.write_table(data, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


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
        stale = meta.get("sae_hash") != (manifest.get("sae") or {}).get("hash") or meta.get("created") != manifest.get("created")
    return values, meta, stale


def read_evaluation(run_dir: str | Path) -> tuple[pa.Table, dict] | None:
    """The run's evaluation rows and their metadata (settings, hashes, timings), or None when it has none."""
    path = Path(run_dir) / EVALUATION
    if not path.is_file():
        return None
    data = pq.read_table(path)
    raw = (data.schema.metadata or {}).get(EVALUATION_META)
    return data, (json.loads(raw) if raw else {})
