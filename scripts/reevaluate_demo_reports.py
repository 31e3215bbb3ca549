"""Re-evaluate a committed demo SAE with ``engine.train.evaluate`` as ``train-sae`` called it, without retraining.

    python scripts/reevaluate_demo_reports.py data/demo_sae --out /tmp/demo_sae.json   # evaluate (minutes)
    python scripts/reevaluate_demo_reports.py data/demo_sae --merge /tmp/demo_sae.json  # add the new keys

The evaluation uses the report's own settings: the first ``eval_contexts`` contexts of ``context_len`` tokens of
``eval_corpus``, ``ce_contexts`` of them for the CE metrics, batches of ``model_batch`` contexts, the model in
``model_dtype`` and the SAE in float32 (as ``train-sae`` evaluated it before storing it in float16). ``--merge``
adds the keys the report lacks to its ``heldout`` section (existing keys and values are kept), the whole
re-evaluation as ``heldout_reevaluated`` (its CE figures follow today's token rule, so they can differ from the
stored ones) and a ``reevaluated`` note with the date and commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def evaluate_report(sae_dir: Path) -> dict:
    import torch

    from engine import load_model, load_sae
    from engine.data.corpus import iter_contexts
    from engine.train import evaluate

    settings = json.loads((sae_dir / "training_report.json").read_text())["settings"]
    lm = load_model(settings["model"], device="cpu", dtype=settings["model_dtype"].removeprefix("torch."))
    sae = load_sae(sae_dir).to(torch.float32)
    contexts = list(itertools.islice(iter_contexts(lm.tokenizer, settings["eval_corpus"] or settings["corpus"],
                                                   settings["context_len"]), settings["eval_contexts"]))
    tick = time.perf_counter()
    heldout = evaluate(lm, sae, settings["hook_name"], contexts, settings["ce_contexts"], settings["model_batch"])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return {"heldout": heldout, "seconds": round(time.perf_counter() - tick, 1), "model_dtype": str(lm.dtype), "cpu": cpu}


def merge(sae_dir: Path, result: dict, commit: str) -> dict:
    """The report with the re-evaluation's new keys added; also what differs among the old keys."""
    path = sae_dir / "training_report.json"
    report = json.loads(path.read_text())
    fresh, held = result["heldout"], report["heldout"]
    report["heldout"] = {**held, **{k: v for k, v in fresh.items() if k not in held}}
    report["heldout_reevaluated"] = fresh
    added = sorted(set(fresh) - set(held))
    changed = {k: (held[k], fresh[k]) for k in held if k in fresh and held[k] != fresh[k]}
    rel = {k: abs(new - old) / max(abs(old), 1e-12) for k, (old, new) in changed.items()}
    worst = max(rel, key=rel.__getitem__) if rel else None
    report["reevaluated"] = (
        f"On {date.today().isoformat()}, at commit {commit}, scripts/reevaluate_demo_reports.py re-evaluated this "
        "SAE (its stored float16 weights, computed in float32) with engine.train.evaluate on the report's held-out "
        "contexts, CE contexts, batch and model dtype, without retraining, on a 2-core "
        f"{result.get('cpu', 'CPU')}: heldout gained {', '.join(added)} from it, and heldout_reevaluated holds the "
        "whole re-evaluation. The other heldout keys are as trained"
        + (f"; re-evaluated, {len(changed)} of them differ, by at most {rel[worst]:.2%} ({worst}: stored "
           f"{changed[worst][0]:.6g}, now {changed[worst][1]:.6g}), from the float16 storage and the machine's bf16 "
           "kernels" if worst else "; re-evaluated, they are unchanged")
    )
    path.write_text(json.dumps(report, indent=2) + "\n")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-evaluate a committed demo SAE's training report.")
    parser.add_argument("sae_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the re-evaluation here")
    parser.add_argument("--merge", type=Path, help="add a re-evaluation written by --out to the SAE's report")
    args = parser.parse_args()
    if args.out:
        result = evaluate_report(args.sae_dir)
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          check=True).stdout.strip()
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    if args.merge:
        result = json.loads(args.merge.read_text())
        for key, (old, new) in merge(args.sae_dir, result, result["commit"]).items():
            print(f"{args.sae_dir.name}: {key} stored {old} re-evaluated {new}", file=sys.stderr)


if __name__ == "__main__":
    main()
