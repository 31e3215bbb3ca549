"""The files of a supervised-dictionary evaluation: ``<out>/supervised/<hook>/`` with ``supervised.json`` (what was
run, approximation, the best F1 per attribute, timings), ``control.parquet`` (success against the number of latents
exchanged) and ``f1.parquet`` (the best latents of each attribute value), built aside and moved into place whole."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic, lock
from .supervised_run import SupervisedResult

SUMMARY = "supervised.json"
FOLDER = "supervised"
TOP_LATENTS = 5
"""Latents kept per attribute value in ``f1.parquet``."""


def hook_dir(out: str | Path, hook: str) -> Path:
    """``out/supervised/<hook>`` (the hook name with anything but letters, digits, '.', '-' and '_' replaced)."""
    return Path(out) / FOLDER / "".join(c if c.isalnum() or c in ".-_" else "_" for c in hook)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (a success rate over no prompt) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def summary(r: SupervisedResult, model: str, sae: str) -> dict[str, Any]:
    """The small JSON."""
    positions = []
    for p in r.positions:
        a = p.approximation
        best = {name: {"mean": float(t.best().mean()), "max": float(t.best().max()), "n_values": len(t.values)}
                for name, t in p.f1.items()}
        positions.append({
            "position": p.position, "n_eval": p.n_eval, "n_moved": p.n_moved, **asdict(a),
            "recovered_sae": a.recovered(a.ld_sae), "recovered_supervised": a.recovered(a.ld_supervised),
            "kept_sae": a.ld_sae / a.ld_clean, "kept_supervised": a.ld_supervised / a.ld_clean,
            "best_f1": best, "control": [_finite(asdict(c)) for c in p.control]})
    return {"task": "ioi", "model": model, "sae": sae, "hook": r.hook, "accuracy": r.accuracy, "n_fit": r.n_fit,
            "config": asdict(r.config), "positions": positions, "timings": r.timings}


def _control_table(r: SupervisedResult) -> pa.Table:
    rows = [(p.position, c.method, c.k, c.success, c.new_io_wins, c.changed) for p in r.positions for c in p.control]
    return pa.table({"position": [x[0] for x in rows], "method": [x[1] for x in rows],
                     "k": np.array([x[2] for x in rows], dtype=np.int32), "success": [x[3] for x in rows],
                     "new_io_wins": [x[4] for x in rows], "latents_changed": [x[5] for x in rows]})


def _f1_table(r: SupervisedResult) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in ("position", "attribute", "value", "support", "rank", "latent", "precision",
                                             "recall", "f1")}
    for p in r.positions:
        for name, t in p.f1.items():
            for v, value in enumerate(t.values):
                order = np.argsort(-t.f1[:, v], kind="stable")[:TOP_LATENTS]
                for rank, j in enumerate(order):
                    for key, item in (("position", p.position), ("attribute", name), ("value", value),
                                      ("support", int(t.support[v])), ("rank", rank), ("latent", int(j)),
                                      ("precision", float(t.precision[j, v])), ("recall", float(t.recall[j, v])),
                                      ("f1", float(t.f1[j, v]))):
                        cols[key].append(item)
    return pa.table(cols)


def write_supervised(out: str | Path, result: SupervisedResult, model: str, sae: str) -> Path:
    """Write ``out/supervised/<hook>/`` whole (replacing an earlier evaluation at that hook) under ``out``'s lock."""
    folder = hook_dir(out, result.hook)
    with lock.hold(out, "saescope circuit --supervised", name=".saescope-circuit-supervised.lock"):
        with atomic.build_dir(folder) as tmp:
            pq.write_table(_control_table(result), tmp / "control.parquet")
            pq.write_table(_f1_table(result), tmp / "f1.parquet")
            (tmp / SUMMARY).write_text(json.dumps(summary(result, model, sae), indent=2))
    return folder


def read_supervised(out: str | Path, hook: str) -> tuple[dict[str, Any], pa.Table, pa.Table] | None:
    """``supervised.json``, the control table and the F1 table of the evaluation at ``hook``, or None."""
    folder = hook_dir(out, hook)
    if not (folder / SUMMARY).is_file():
        return None
    return (json.loads((folder / SUMMARY).read_text()), pq.read_table(folder / "control.parquet"),
            pq.read_table(folder / "f1.parquet"))
