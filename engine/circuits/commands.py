"""The ``saescope circuit`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json

from .. import configs
from ..model.commands import load_cli_model, model_arguments


def cmd_circuit(args: argparse.Namespace) -> int:
    from .files import task_lock, write_circuit
    from .pipeline import CircuitConfig, run_circuit
    from .tasks import load_task, task_name

    cfg = configs.from_args(CircuitConfig, args)
    with task_lock(args.out, task_name(args.task)):  # a second run of this task into --out is refused at once
        lm = load_cli_model(args.model, args.device, args.dtype)
        task = load_task(args.task, lm.tokenizer, cfg.n_prompts, cfg.seed)
        result = run_circuit(lm, task, cfg)
        folder = write_circuit(args.out, result, args.model)
    perf = result.performance
    summary = {"out": str(folder), "accuracy": perf.accuracy, "logit_diff": perf.logit_diff,
               "circuit_size": int(result.circuit.sum()),
               **{f"auc_{a.method}_vs_{a.reference}": round(a.roc.auc, 4) for a in result.agreements},
               **{k: round(v, 2) for k, v in result.timings.items()}}
    print(json.dumps(summary, indent=2))
    return 0


def add_parsers(sub) -> None:
    from .pipeline import CircuitConfig
    from .tasks import BUILTIN

    p = sub.add_parser("circuit", help="find a task's attention-head circuit from SAE codes and check it by patching")
    model_arguments(p)
    p.add_argument("--task", required=True, help=f"{', '.join(BUILTIN)} or a JSONL file of prompt pairs")
    p.add_argument("--out", default="circuits", help="folder that receives <task>/ (default: circuits)")
    configs.add_arguments(p, CircuitConfig)
    p.set_defaults(func=cmd_circuit)
