"""The ``saescope train-sae`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json

from ..data.corpus import CORPUS_HELP
from ..model.commands import load_cli_model, model_arguments


def cmd_train(args: argparse.Namespace) -> int:
    from .sae import TrainConfig, prepare_output, train_sae

    prepare_output(args.out, args.force)  # refuse before loading anything
    cfg = TrainConfig(
        hook_name=args.hook, corpus=args.corpus, width=args.width, k=args.k, tokens=args.tokens,
        eval_corpus=args.eval_corpus, context_len=args.context_len, batch_size=args.batch_size,
        reuse=args.reuse, lr=args.lr, seed=args.seed,
    )
    lm = load_cli_model(args.model, args.device, args.dtype)
    report = train_sae(lm, cfg, args.out, force=args.force)
    print(json.dumps({"out": args.out, "tokens_seen": report["tokens_seen"], **report["heldout"]}, indent=2))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train-sae", help="train a TopK SAE on streamed activations")
    model_arguments(p)
    p.add_argument("--hook", required=True, help="e.g. blocks.15.hook_resid_post")
    p.add_argument("--corpus", required=True, help=CORPUS_HELP)
    p.add_argument("--eval-corpus", help="held-out corpus for the report (default: first contexts of --corpus)")
    p.add_argument("--width", type=int, required=True, help="number of latents")
    p.add_argument("--k", type=int, required=True, help="latents kept per token")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--out", required=True, help="output directory (SAELens v6 format)")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per optimisation step")
    p.add_argument("--reuse", type=int, default=1, help="passes over each shuffle-buffer fill")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_train)
