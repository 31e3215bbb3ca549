"""The ``saescope compare`` and ``saescope evaluate`` commands (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json

from .. import configs

PROBING_SKIP = ("batch_size", "seed")
"""Sparse probing's own batch size and seed stay at their defaults (evaluate's --batch-size is the core metrics')."""


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare_runs

    cfg = configs.from_args(CompareConfig, args)
    folders = compare_runs(args.runs, cfg=cfg, out=args.out, device=args.device, dtype=args.dtype)
    report = []
    for folder in folders:
        info = json.loads((folder / "comparison.json").read_text())
        report.append({"folder": str(folder), "a": info["a"]["run"], "b": info["b"]["run"],
                       "assignment": info["assignment"]["method"], **info["summary"], "timings": info["timings"]})
    print(json.dumps(report, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .absorption import AbsorptionConfig
    from .evaluate import DEFAULT_PARTS, EvaluateConfig, evaluate_run
    from .files import evaluation_summary
    from .separability import SeparabilityConfig
    from .sparse_probing import ProbingConfig

    if args.concepts and tuple(args.parts) == DEFAULT_PARTS:
        args.parts = (*DEFAULT_PARTS, "separability")
    cfg = configs.from_args(EvaluateConfig, args, probing=configs.from_args(ProbingConfig, args, skip=PROBING_SKIP),
                            absorption=AbsorptionConfig(words=args.absorption_words),
                            separability=SeparabilityConfig(concepts=args.concepts, pool=args.separability_pool))
    path = evaluate_run(args.run, cfg, device=args.device, dtype=args.dtype)
    found = evaluation_summary(args.run)
    assert found is not None
    values, meta, _ = found
    summary = {key: round(value, 4) for key, value in values.items()}
    print(json.dumps({"out": str(path), **summary, "timings": meta.get("timings")}, indent=2))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("compare", help="compare runs of SAEs on the same model and hook: matched latents, splitting")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two runs or more (sorted by width; each compared with the next)")
    p.add_argument("--out", help="write each comparison to OUT/<A>--<B>/ (default: <A>/compare/<B>/, A the narrower)")
    from .compare import CompareConfig

    configs.add_arguments(p, CompareConfig, help={
        "split_cos": "decoder cosine of a split child with its parent (default: 0.5)",
        "cofire": "fraction of a child's firings where the parent fires (default: 0.5)",
        "min_fires": "firings a child needs in the sample (default: 5)",
    })
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="SAEBench-style metrics of a run's SAE (offline) into <RUN>/evaluation.parquet")
    p.add_argument("run", help="a finished run directory")
    from .evaluate import EvaluateConfig
    from .sparse_probing import ProbingConfig

    configs.add_arguments(p, EvaluateConfig, help={
        "parts": "comma-separated parts to compute (default: core,sparse_probing,absorption, and separability "
                 "when --concepts is given)",
    })
    configs.add_arguments(p, ProbingConfig, skip=PROBING_SKIP, help={
        "train_per_class": "probing texts per class, train side (default: 400)",
        "test_per_class": "probing texts per class, test side (default: 100)",
    })
    p.add_argument("--absorption-words", type=int, default=4000,
                   help="vocabulary words of the first-letter task (0: every letter-only token, as SAEBench)")
    p.add_argument("--concepts", help="a JSONL of {\"text\", \"label\"} lines: adds concept separability (Fereidouni "
                   "et al.) of the latents and of the neurons at the hook (demo: data/concepts/python-docs-manuals.jsonl)")
    p.add_argument("--separability-pool", choices=("last", "max"), default="last",
                   help="a text's value of a unit: at its last counted token or its maximum (default: last)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_evaluate)
