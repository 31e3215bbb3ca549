"""The files of a circuit run: ``<out>/<task>/`` with ``prompts``, ``codes``, ``heads`` and ``pairs`` Parquet tables
and ``metrics.json``; the folder is built aside and moved into place whole, under the output folder's lock."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic, lock
from .pipeline import CircuitResult
from .scores import top_pairs

TABLES = ("prompts", "codes", "heads", "pairs")
METRICS = "metrics.json"


def head_label(layer: int, head: int) -> str:
    """``L12.H3``."""
    return f"L{layer}.H{head}"


def _heads_table(r: CircuitResult) -> pa.Table:
    layer, head = np.divmod(np.arange(r.n_layers * r.n_heads), r.n_heads)
    return pa.table({
        "layer": layer.astype(np.int32), "head": head.astype(np.int32),
        "label": [head_label(int(a), int(b)) for a, b in zip(layer, head, strict=True)],
        "unique_positive": r.unique_positive, "node_score": r.node, "edge_score": r.edge,
        "patch_effect": r.patching.patch.ravel(), "mean_ablation_effect": r.patching.mean_ablation.ravel(),
        "path_patch_effect": (r.path if r.path is not None else np.full((r.n_layers, r.n_heads), np.nan)).ravel(),
        "in_circuit": r.circuit.ravel(),
    })


def _prompts_table(r: CircuitResult) -> pa.Table:
    n = len(r.task.pairs)
    pairs = list(r.task.pairs) * 2
    return pa.table({
        "prompt": np.arange(2 * n, dtype=np.int32), "pair": np.tile(np.arange(n, dtype=np.int32), 2),
        "positive": np.arange(2 * n) < n,
        "text": [p.prompt for p in r.task.pairs] + [p.counterfactual for p in r.task.pairs],
        "token_ids": [list(p.prompt_ids) for p in r.task.pairs] + [list(p.counterfactual_ids) for p in r.task.pairs],
        "answer": [p.answer for p in pairs], "wrong": [p.wrong for p in pairs],
        "metric": np.array(r.performance.per_prompt + r.performance.per_counterfactual),
    })


def _codes_table(r: CircuitResult) -> pa.Table:
    n_prompts, n_heads = r.codes.shape
    prompt, head = np.divmod(np.arange(n_prompts * n_heads), n_heads)
    return pa.table({"prompt": prompt.astype(np.int32), "head_index": head.astype(np.int32),
                     "code": r.codes.ravel().astype(np.int32)})


def _pairs_table(r: CircuitResult, n: int = 200) -> pa.Table:
    rows = top_pairs(r.pair_counts, n)
    return pa.table({"head_a": np.array([a for a, _, _ in rows], dtype=np.int32),
                     "head_b": np.array([b for _, b, _ in rows], dtype=np.int32),
                     "unique_cooccurrences": np.array([c for _, _, c in rows], dtype=np.float64)})


def metrics(r: CircuitResult, model: str) -> dict[str, Any]:
    """The small JSON: what was run, how well the model does the task, agreement, timings."""
    perf = asdict(r.performance)
    perf.pop("per_prompt")
    perf.pop("per_counterfactual")
    return {
        "task": r.task.name, "model": model, "n_layers": r.n_layers, "n_heads": r.n_heads,
        "n_pairs": len(r.task.pairs), "config": asdict(r.config), "performance": perf,
        "sae_final_loss": r.sae_final_loss, "circuit_size": int(r.circuit.sum()),
        "logit_diff_clean": r.patching.logit_diff_clean,
        "logit_diff_counterfactual": r.patching.logit_diff_counterfactual,
        "agreement": [{"reference": a.reference, "method": a.method, "auc": a.roc.auc,
                       "fpr": a.roc.fpr.tolist(), "tpr": a.roc.tpr.tolist(),
                       **{k: float(v) for k, v in a.point._asdict().items()}} for a in r.agreements],
        "timings": r.timings,
    }


def task_dir_name(name: str) -> str:
    """A folder name for a task (its name with anything but letters, digits, '-' and '_' replaced)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned or "task"


def task_lock(out: str | Path, task_name: str):
    """The lock of one task's folder under ``out`` (runs of other tasks into the same ``out`` go on at once)."""
    return lock.hold(out, "saescope circuit", name=f".saescope-circuit-{task_dir_name(task_name)}.lock")


def write_circuit(out: str | Path, result: CircuitResult, model: str) -> Path:
    """Write ``out/<task>/`` whole (replacing an earlier run of the task), holding the task's lock."""
    out = Path(out)
    with task_lock(out, result.task.name):
        with atomic.build_dir(out / task_dir_name(result.task.name)) as tmp:
            for name, table in (("prompts", _prompts_table(result)), ("codes", _codes_table(result)),
                                ("heads", _heads_table(result)), ("pairs", _pairs_table(result))):
                pq.write_table(table, tmp / f"{name}.parquet")
            (tmp / METRICS).write_text(json.dumps(metrics(result, model), indent=2))
    return out / task_dir_name(result.task.name)


def list_circuits(out: str | Path) -> list[str]:
    """Task folders under ``out`` that hold a complete circuit run."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.is_dir() and (p / METRICS).is_file() and not p.name.startswith("."))


def read_circuit(folder: str | Path) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """``metrics.json`` and the four tables of a circuit folder."""
    folder = Path(folder)
    if not (folder / METRICS).is_file():
        raise FileNotFoundError(f"no circuit run in {folder} (no {METRICS})")
    return (json.loads((folder / METRICS).read_text()),
            {name: pq.read_table(folder / f"{name}.parquet") for name in TABLES})
