"""The ``saescope compare`` and ``saescope evaluate`` commands (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare_runs

    cfg = CompareConfig(tokens=args.tokens, batch_size=args.batch_size, candidates=args.candidates, min_cos=args.min_cos,
                        method=args.method, split_cos=args.split_cos, cofire=args.cofire, min_fires=args.min_fires)
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
    from .evaluate import EvaluateConfig, evaluate_run
    from .files import evaluation_summary
    from .sparse_probing import ProbingConfig

    cfg = EvaluateConfig(
        parts=tuple(p for p in args.parts.split(",") if p), tokens=args.tokens, batch_size=args.batch_size,
        probe_corpus=args.probe_corpus,
        probing=ProbingConfig(train_per_class=args.train_per_class, test_per_class=args.test_per_class),
        absorption=AbsorptionConfig(words=args.absorption_words),
    )
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
    p.add_argument("--tokens", type=int, default=32768, help="sample tokens for activation correlations and co-firing")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per model forward")
    p.add_argument("--candidates", type=int, default=16, help="most similar latents of B kept per latent of A")
    p.add_argument("--min-cos", type=float, default=0.0, help="decoder cosine a one-to-one pair must exceed")
    p.add_argument("--method", choices=("auto", "lsa", "greedy"), default="auto",
                   help="one-to-one assignment (auto: exact LSA up to 2^24 cells of the similarity, greedy above)")
    p.add_argument("--split-cos", type=float, default=0.5, help="decoder cosine of a split child with its parent")
    p.add_argument("--cofire", type=float, default=0.5, help="fraction of a child's firings where the parent fires")
    p.add_argument("--min-fires", type=int, default=5, help="firings a child needs in the sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="SAEBench-style metrics of a run's SAE (offline) into <RUN>/evaluation.parquet")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--parts", default="core,sparse_probing,absorption", help="comma-separated parts to compute")
    p.add_argument("--tokens", type=int, default=16384, help="sample tokens of the run for the core metrics")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per model forward")
    p.add_argument("--probe-corpus", help="corpus of the sparse-probing texts (default: the run's corpus)")
    p.add_argument("--train-per-class", type=int, default=400, help="probing texts per class, train side")
    p.add_argument("--test-per-class", type=int, default=100, help="probing texts per class, test side")
    p.add_argument("--absorption-words", type=int, default=4000,
                   help="vocabulary words of the first-letter task (0: every letter-only token, as SAEBench)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_evaluate)
