"""The ``saescope info``, ``serve``, ``demo``, ``export`` and ``bench`` commands (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import settings
from ..model.commands import load_cli_model, model_arguments
from ..precompute.commands import stop_with_parent


def cmd_info(args: argparse.Namespace) -> int:
    if args.settings:
        for name, value, doc in settings.describe():
            print(f"{name} = {value}\n    {doc}")
        if not args.model and not args.path:
            return 0
    if args.model:
        lm = load_cli_model(args.model, args.device, args.dtype)
        print(f"model: {lm.name}\nfamily: {lm.family.name} ({lm.config.model_type})")
        print(
            f"layers: {lm.n_layers}  d_model: {lm.d_model}  heads: {lm.n_heads}x{lm.d_head}  "
            f"dtype: {lm.dtype}  device: {lm.device}"
        )
        if lm.dtype_choice is not None:
            print(f"dtype {lm.dtype_choice.dtype} ({args.dtype}): {lm.dtype_choice.reason}")
        if lm.device.type == "cpu":
            from ..model.machine import cpu_facts

            facts = cpu_facts()
            flags = " ".join(facts.flags) or "none of interest"
            print(f"cpu: {facts.model}; flags: {flags}; {facts.threads} threads; torch {facts.torch}")
        print("hook points:")
        for name in lm.hook_points():
            print(f"  {name}  [{lm.hook_width(name)}]")
    if args.path:
        from ..saes import load_sae

        sae = load_sae(args.path)
        c = sae.cfg
        info = {"architecture": c.architecture, "d_in": c.d_in, "d_sae": c.d_sae, "hook": c.hook_name, "dtype": c.dtype}
        if c.k:
            info["k"] = c.k
        if c.model_name:
            info["model"] = c.model_name
        for key, value in info.items():
            print(f"{key}: {value}")
    if not args.model and not args.path:
        print("saescope info: give an SAE path and/or --model", file=sys.stderr)
        return 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import NeuronpediaOptions, export_run

    options = NeuronpediaOptions(
        model_id=args.model_id, source_set=args.source_set, layer=args.layer, creator_id=args.creator_id,
        creator_name=args.creator_name, release=args.release, visibility=args.visibility,
    )
    done = export_run(args.run, args.out, args.format, force=args.force, options=options, progress=not args.quiet)
    summary = {"out": str(done.out), "format": done.format, "features": done.n_features, "examples": done.n_examples,
               "explanations": done.n_explanations, "seconds": round(done.seconds, 2)}
    if done.source_dir is not None:
        summary["import"] = str(done.source_dir)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    if args.wide:
        from .bench_wide import wide_bench

        widths = [int(w) for w in args.wide.split(",")]
        print(json.dumps(wide_bench(widths, args.tokens, args.corpus), indent=2))
        return 0

    result = run_bench(model=args.model, tiny=args.tiny, tokens=args.tokens, corpus=args.corpus, store_dir=args.store,
                       queries=not args.no_queries, live=not args.no_live, search_latents=args.search_latents)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _app_explainer(args: argparse.Namespace) -> None:
    """``--explainer``/``--explainer-model`` into the environment the app server inherits (dashboard/cache.py)."""
    if args.explainer:
        os.environ[settings.EXPLAINER.name] = args.explainer
        os.environ[settings.EXPLAINER_MODEL.name] = args.explainer_model or ""
    elif args.explainer_model:
        raise ValueError("--explainer-model names the model an --explainer endpoint serves: pass --explainer too")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    _app_explainer(args)
    return serve(args.run, host=args.host, port=args.port, token=args.token, read_only=args.read_only)


def cmd_demo(args: argparse.Namespace) -> int:
    from .serve import access_token, demo_runs_dir, ensure_demo_runs, port_is_free, serve, start_demo_runs

    names = [n.strip() for arg in args.sae for n in arg.split(",") if n.strip()] if args.sae else None
    opts = {"tokens": args.tokens, "force": args.force, "device": args.device, "dtype": args.dtype}
    if args.no_serve:
        if args.stop_with_parent:  # the background child of a serving `saescope demo`
            stop_with_parent(args.stop_with_parent)
        runs = ensure_demo_runs(names, **opts)
        print(f"saescope demo: runs ready in {demo_runs_dir()}: {', '.join(r.name for r in runs)}")
        return 0
    if not port_is_free(args.host, args.port):  # before starting a background precompute
        raise ValueError(f"port {args.port} on {args.host} is already in use: pass another with --port")
    access_token(args.host, args.token)  # a token too short is refused before then too
    _app_explainer(args)
    from .demo import demo_saes

    runs = start_demo_runs(names, **opts)
    return serve(runs, host=args.host, port=args.port, first=demo_saes(names)[0].run, token=args.token,
                 read_only=args.read_only)


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="describe an SAE and/or list a model's hook points")
    p.add_argument("path", nargs="?", help="SAE directory (SAELens or sparsify) or SAELens RELEASE/SAE_ID")
    model_arguments(p, required=False)
    p.add_argument("--settings", action="store_true",
                   help="list every SAESCOPE_* environment variable, its value here (secrets hidden) and what it does")
    p.set_defaults(func=cmd_info)

    def app_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; any "
                       "other needs an access token, generated when none is given)")
        p.add_argument("--token", help="access token each browser session must give once (default: $SAESCOPE_TOKEN, "
                       "which stays out of the process list; 16 characters or more)")
        p.add_argument("--read-only", action="store_true",
                       help="turn off the app's actions that write into runs (Explain now, Compare now)")
        p.add_argument("--port", type=int, default=8501)
        p.add_argument("--explainer", help="enable 'Explain this latent now' on feature pages: demo, a chat model folder "
                       "or hub id, or an OpenAI-compatible endpoint http://host:port/v1 (key: $SAESCOPE_EXPLAINER_KEY)")
        p.add_argument("--explainer-model", help="the served model's name, with an endpoint --explainer")

    p = sub.add_parser("serve", help="open precomputed runs in the browser app")
    p.add_argument("--run", required=True, help="a run directory, or a directory of runs (the app shows a picker)")
    app_opts(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="fetch the demo model, precompute the demo SAEs' runs and start the app")
    from .demo import DEMO_SAES

    p.add_argument("--sae", action="append", metavar="NAME[,NAME]",
                   help=f"the demo SAEs to prepare, one run each (default: every one on disk): "
                   f"{', '.join(s.run for s in DEMO_SAES)} (in this order; the app opens on the first chosen)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to precompute each demo run on (default 200,000)")
    p.add_argument("--force", action="store_true", help="recompute the demo runs even where a complete one exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (the fastest on this machine), float32, bfloat16 or float16")
    p.add_argument("--no-serve", action="store_true", help="prepare the demo runs, one after another, then exit")
    p.add_argument("--stop-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    app_opts(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("export", help="write a run's latents for Neuronpedia's importer or, as JSONL, for any tool")
    p.add_argument("run", help="a run directory")
    p.add_argument("out", help="folder to write (neuronpedia: OUT/<modelId>/<sourceId>/...), or file (jsonl; .gz compresses)")
    p.add_argument("--format", choices=("neuronpedia", "jsonl"), default="neuronpedia")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (swapped in whole when complete)")
    p.add_argument("--model-id", help="neuronpedia: model id (default: the run's model name, lower-cased)")
    p.add_argument("--source-set", help="neuronpedia: source set name (default: saescope-<hook kind>-<width>)")
    p.add_argument("--layer", type=int, help="neuronpedia: layer in the source id <layer>-<source set> (default: from the hook)")
    p.add_argument("--release", help="neuronpedia: release name (default: the source set)")
    p.add_argument("--creator-id", default="clkht01d40000jv08hvalcvly",
                   help="neuronpedia: the user id owning the rows (default: the user a fresh Neuronpedia instance seeds)")
    p.add_argument("--creator-name", default="saescope")
    p.add_argument("--visibility", default="PUBLIC", choices=("PUBLIC", "PRIVATE", "UNLISTED"))
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="measure precompute and query performance")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", choices=("demo", "gpt2", "tiny"), help="demo (default when on disk), gpt2 (a random "
                   "GPT-2-small-shaped model with a 6,144-latent TopK SAE) or tiny")
    p.add_argument("--tiny", action="store_true", help="same as --model tiny")
    p.add_argument("--tokens", type=int, help="tokens of the larger precompute run (the smaller is a quarter)")
    p.add_argument("--corpus", help="corpus for the precompute runs (default: the demo's held-out corpus)")
    p.add_argument("--store", help="synthetic 1M-latent store (default data/cache/bench_store; built once)")
    p.add_argument("--no-queries", action="store_true", help="skip the query-latency parts (feature pages, search by meaning)")
    p.add_argument("--search-latents", type=int, default=1_000_000,
                   help="explained latents of the synthetic search-by-meaning index (default 1M; built once, cached)")
    p.add_argument("--no-live", action="store_true", help="skip the prompt-lens and steering ratios")
    p.add_argument("--wide", metavar="D_SAE[,D_SAE]", help="instead: random TopK SAEs of these widths on the demo "
                   "model, precomputed end to end (262,144 on 65,536 tokens, 1,048,576 on 16,384 unless --tokens), and "
                   "the wide kernels side by side (engine/tools/bench_wide.py); one JSON")
    p.set_defaults(func=cmd_bench)
