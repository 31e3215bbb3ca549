"""The ``saescope train-sae`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import configs
from ..data.corpus import CORPUS_HELP
from ..model.commands import load_cli_model, model_arguments


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_dir
    from .sae import TrainConfig, prepare_output, train_sae

    prepare_output(args.out, args.force)  # refuse before loading anything
    cfg = configs.from_args(TrainConfig, args)
    lm = load_cli_model(args.model, args.device, args.dtype)
    try:
        report = train_sae(lm, cfg, args.out, force=args.force, restart=args.restart)
    except KeyboardInterrupt:
        if checkpoint_dir(args.out).is_dir():
            print(f"saescope train-sae: its last checkpoint is in {checkpoint_dir(args.out)}: rerun the same command to "
                  "resume", file=sys.stderr)
        raise
    print(json.dumps({"out": args.out, "tokens_seen": report["tokens_seen"], **report["heldout"]}, indent=2))
    return 0


def cmd_train_transcoders(args: argparse.Namespace) -> int:
    from .transcoders import TranscoderTrainConfig, train_transcoders

    cfg = configs.from_args(TranscoderTrainConfig, args)
    lm = load_cli_model(args.model, args.device, args.dtype)
    report = train_transcoders(lm, cfg, args.out, stop_after_steps=args.stop_after_steps)
    summary = {"out": args.out, "partial": report["partial"], "tokens_seen": report["tokens_seen"], "steps": report["steps"]}
    if "heldout" in report:
        held = report["heldout"]
        summary.update(ce_loss_recovered_all=held["ce_loss_recovered_all"],
                       explained_variance={k: round(v["explained_variance"], 3) for k, v in held["layers"].items()})
    print(json.dumps(summary, indent=2))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train-sae", help="train an SAE (TopK, g-SAE, feature/mutual choice, Matryoshka) on streamed activations")
    model_arguments(p)
    p.add_argument("--out", required=True, help="output directory (SAELens v6 format)")
    from .sae import TrainConfig

    configs.add_arguments(p, TrainConfig, flags={"hook_name": "--hook"}, help={"corpus": CORPUS_HELP})
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--restart", action="store_true",
                   help="discard the checkpoint an interrupted run left beside --out instead of resuming it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-transcoders", help="train per-layer TopK transcoders (MLP input -> MLP output) on many "
                       "layers in one pass; resumable (run the same command again)")
    model_arguments(p)
    p.add_argument("--out", required=True, help="output directory: layer_L/ SAELens folders, training_report.json")
    from .transcoders import TranscoderTrainConfig

    configs.add_arguments(p, TranscoderTrainConfig, help={"corpus": CORPUS_HELP})
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop (checkpointed, resumable) after this many steps of this run")
    p.set_defaults(func=cmd_train_transcoders)
