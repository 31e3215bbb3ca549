"""The ``saescope train-sae`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import configs
from ..data.corpus import CORPUS_HELP
from ..model.commands import load_cli_model, model_arguments


def pass_configs(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The configs and outputs of ``train-sae``: ``--architecture A,B,... --out DIR_A,DIR_B,...`` trains several
    SAEs in one pass (``--matryoshka-widths`` and ``--gradient-beta`` go to the SAEs of their families only)."""
    from .sae import TrainConfig

    archs = [a.strip() for a in args.architecture.split(",")]
    outs = [o.strip() for o in args.out.split(",")]
    if len(archs) != len(outs):
        raise ValueError(f"--architecture names {len(archs)} SAE families and --out {len(outs)} folders: give one "
                         "folder per family, in the same order")
    if len(set(archs)) != len(archs):
        raise ValueError(f"--architecture names a family twice ({args.architecture}): train each once per pass")
    if len(archs) > 1 and args.matryoshka_widths and "matryoshka" not in archs:
        raise ValueError(f"--matryoshka-widths applies to --architecture matryoshka, not {args.architecture}")
    cfgs = []
    for arch in archs:
        widths = args.matryoshka_widths if arch == "matryoshka" or len(archs) == 1 else ""
        cfgs.append(configs.from_args(TrainConfig, args, architecture=arch, matryoshka_widths=widths))
    return cfgs, outs


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_dir
    from .sae import prepare_output, train_saes

    cfgs, outs = pass_configs(args)
    for out in outs:
        prepare_output(out, args.force)  # refuse before loading anything
    lm = load_cli_model(args.model, args.device, args.dtype)
    try:
        reports = train_saes(lm, cfgs, outs, force=args.force, restart=args.restart)
    except KeyboardInterrupt:
        left = [str(checkpoint_dir(o)) for o in outs if checkpoint_dir(o).is_dir()]
        if left:
            print(f"saescope train-sae: its last checkpoint is in {', '.join(left)}: rerun the same command to "
                  "resume", file=sys.stderr)
        raise
    shown = [{"out": out, "architecture": c.architecture, "tokens_seen": r["tokens_seen"], **r["heldout"]}
             for out, c, r in zip(outs, cfgs, reports, strict=True)]
    print(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2))
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


def cmd_family_table(args: argparse.Namespace) -> int:
    from .family_table import FamilyTableConfig, family_table, markdown

    cfg = configs.from_args(FamilyTableConfig, args)
    lm = load_cli_model(args.model, args.device, args.dtype)
    table = family_table(lm, args.saes, cfg, args.out, progress=True, reuse=not args.remeasure)
    print(markdown(table))
    print(f"\nwritten to {args.out}/family_table.parquet and family_table.json", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train-sae", help="train an SAE (TopK, g-SAE, feature/mutual choice, Matryoshka) on streamed activations")
    model_arguments(p)
    p.add_argument("--out", required=True, help="output directory (SAELens v6 format); with several comma-separated "
                   "--architecture families, one comma-separated folder per family")
    from .sae import TrainConfig

    configs.add_arguments(p, TrainConfig, flags={"hook_name": "--hook"}, help={
        "corpus": CORPUS_HELP,
        "architecture": "SAE family: topk, gradient_topk (g-SAE), feature_choice, mutual_choice or matryoshka "
                        "(default: topk); comma-separated, several SAEs trained in one pass over the same activations "
                        "(one model forward feeds them all), each equal to the SAE trained alone"})
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

    p = sub.add_parser("family-table", help="SAEs of several families at one hook on the same held-out tokens: L0 "
                       "distribution, EV, CE recovered, KL, dead/dense fractions, steering effectiveness")
    model_arguments(p)
    p.add_argument("saes", nargs="+", metavar="SAE_DIR", help="SAE folders (one hook; named by their folder names)")
    p.add_argument("--out", required=True, help="folder for family_table.parquet and family_table.json (put it in the "
                   "served run directory, e.g. data/runs/families, for the Compare page)")
    from .family_table import FamilyTableConfig

    configs.add_arguments(p, FamilyTableConfig, help={"eval_corpus": "held-out corpus: " + CORPUS_HELP})
    p.add_argument("--remeasure", action="store_true", help="measure every SAE again (by default a row already in "
                   "--out, made with the same settings, model, dtype and hook from a byte-identical folder, is kept)")
    p.set_defaults(func=cmd_family_table)
