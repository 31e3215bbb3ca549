"""Run-level figures of a run's scores, per explainer and scorer, as ``saescope explain`` prints them and the
README's explanation table quotes: the mean score, the mean AUROC of the judge's probabilities beside the
balanced accuracy (detection, fuzzing), the failed-judgement rate, and the mean score per activation quantile
(0 = the highest; -1: the non-activating excerpts), as delphi reports its scores per decile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import parts, schema


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def report(run_dir: str | Path, feature_ids: list[int] | None = None) -> dict[str, dict[str, dict]]:
    """``{explainer: {scorer: {"n", "score", "auroc", "failure_rate", "by_quantile"}}}`` over the latents with a
    defined score (``feature_ids``: only those). ``failure_rate`` pools every judgement of the scorer."""
    sc = parts.read_all(Path(run_dir), schema.SCORES)
    wanted = set(feature_ids) if feature_ids is not None else None
    acc: dict[tuple[str, str], dict] = {}
    for fid, who, scorer, score, details in zip(sc["feature_id"].to_pylist(), sc["explainer"].to_pylist(),
                                                sc["scorer"].to_pylist(), sc["score"].to_pylist(),
                                                sc["details"].to_pylist(), strict=True):
        if wanted is not None and fid not in wanted:
            continue
        d = json.loads(details or "{}")
        a = acc.setdefault((who, scorer), {"score": [], "auroc": [], "failed": 0, "judged": 0, "q": {}})
        a["score"].append(score)
        a["auroc"].append(d.get("auroc"))
        if "failed" in d:
            a["failed"] += int(d["failed"])
            a["judged"] += len(d.get("mass") or d.get("groups") or [])
        for q, v in (d.get("by_quantile") or {}).items():
            a["q"].setdefault(int(q), []).append(v)
    out: dict[str, dict[str, dict]] = {}
    for (who, scorer), a in sorted(acc.items()):
        out.setdefault(who, {})[scorer] = {
            "n": sum(1 for v in a["score"] if v is not None),
            "score": _mean(a["score"]),
            "auroc": _mean(a["auroc"]),
            "failure_rate": round(a["failed"] / a["judged"], 4) if a["judged"] else None,
            "by_quantile": {q: _mean(v) for q, v in sorted(a["q"].items(), key=lambda kv: (kv[0] < 0, kv[0]))},
        }
    return out
