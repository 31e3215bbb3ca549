"""The ``saescope circuit`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import configs
from ..model.commands import load_cli_model, model_arguments


def run_sae_path(out: str | Path) -> str:
    """The SAE of the run that holds ``out`` (``RUN/circuits``: the manifest one folder up), for ``--supervised``
    without ``--sae``."""
    from ..run.loaded import sae_source
    from ..run.schema import MANIFEST

    manifest = Path(out).resolve().parent / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"--supervised needs an SAE: pass --sae PATH, or --out RUN_DIR/circuits of a run "
                         f"(no {MANIFEST} in {manifest.parent})")
    return sae_source(json.loads(manifest.read_text()))


def cmd_supervised(args: argparse.Namespace) -> int:
    from ..saes import load_sae
    from .supervised_files import summary, write_supervised
    from .supervised_run import SupervisedConfig, run_supervised

    if args.task != "ioi":
        raise ValueError(f"--supervised evaluates an SAE on IOI's attributes: use --task ioi, not {args.task!r}")
    cfg = configs.from_args(SupervisedConfig, args)
    sae_path = args.sae or run_sae_path(args.out)
    lm = load_cli_model(args.model, args.device, args.dtype)
    sae = load_sae(sae_path, device=lm.device)
    result = run_supervised(lm, sae, cfg, hook=args.hook, seed=args.seed, min_accuracy=args.min_accuracy)
    folder = write_supervised(args.out, result, args.model, str(sae_path))
    info = summary(result, args.model, str(sae_path))
    shown = {"out": str(folder), "hook": info["hook"], "accuracy": info["accuracy"], **{
        p["position"]: {"recovered_sae": round(p["recovered_sae"], 3),
                        "recovered_supervised": round(p["recovered_supervised"], 3),
                        "best_f1": {a: round(b["mean"], 3) for a, b in p["best_f1"].items()},
                        "success": {f"{c['method']}{c['k'] or ''}": round(c["success"], 3) for c in p["control"]}}
        for p in info["positions"]}, **{k: round(v, 2) for k, v in result.timings.items()}}
    print(json.dumps(shown, indent=2))
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    from .files import task_lock, write_circuit
    from .pipeline import CircuitConfig, run_circuit
    from .tasks import load_task, task_name

    if args.supervised:
        return cmd_supervised(args)
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
    from .supervised_run import SupervisedConfig
    from .tasks import BUILTIN

    p = sub.add_parser("circuit", help="find a task's attention-head circuit from SAE codes and check it by patching")
    model_arguments(p)
    p.add_argument("--task", required=True, help=f"{', '.join(BUILTIN)} or a JSONL file of prompt pairs")
    p.add_argument("--out", default="circuits", help="folder that receives <task>/ (default: circuits)")
    configs.add_arguments(p, CircuitConfig)
    g = p.add_argument_group("supervised dictionaries (Makelov et al. 2024; --task ioi)")
    g.add_argument("--supervised", action="store_true",
                   help="instead of the circuit, evaluate an SAE against IOI's supervised dictionary at its hook; "
                        "writes <out>/supervised/<hook>/")
    g.add_argument("--sae", default=None, help="the SAE to evaluate (default: the run's, when --out is RUN_DIR/circuits)")
    g.add_argument("--hook", default=None, help="the hook the SAE must read (default: the SAE's own)")
    configs.add_arguments(p, SupervisedConfig)
    p.set_defaults(func=cmd_circuit)
