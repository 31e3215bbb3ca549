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
