"""The ``saescope`` command line."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: spin-waiting is 3-70x slower on shared CPUs

import argparse
import json
import sys

from . import settings


def _model(name: str, device: str, dtype: str):
    from .model.loading import load_model

    if name == "demo":
        from .tools.demo import ensure_demo_model

        name = str(ensure_demo_model())
    return load_model(name, device=device, dtype=dtype)


def cmd_info(args: argparse.Namespace) -> int:
    if args.settings:
        for name, value, doc in settings.describe():
            print(f"{name} = {value}\n    {doc}")
        if not args.model and not args.path:
            return 0
    if args.model:
        lm = _model(args.model, args.device, args.dtype)
        print(f"model: {lm.name}\nfamily: {lm.family.name} ({lm.config.model_type})")
        print(
            f"layers: {lm.n_layers}  d_model: {lm.d_model}  heads: {lm.n_heads}x{lm.d_head}  "
            f"dtype: {lm.dtype}  device: {lm.device}"
        )
        if lm.dtype_choice is not None:
            print(f"dtype {lm.dtype_choice.dtype} ({args.dtype}): {lm.dtype_choice.reason}")
        if lm.device.type == "cpu":
            from .model.machine import cpu_facts

            facts = cpu_facts()
            flags = " ".join(facts.flags) or "none of interest"
            print(f"cpu: {facts.model}; flags: {flags}; {facts.threads} threads; torch {facts.torch}")
        print("hook points:")
        for name in lm.hook_points():
            print(f"  {name}  [{lm.hook_width(name)}]")
    if args.path:
        from .saes import load_sae

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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, prepare_output, train_sae

    prepare_output(args.out, args.force)  # refuse before loading anything
    cfg = TrainConfig(
        hook_name=args.hook, corpus=args.corpus, width=args.width, k=args.k, tokens=args.tokens,
        eval_corpus=args.eval_corpus, context_len=args.context_len, batch_size=args.batch_size,
        reuse=args.reuse, lr=args.lr, seed=args.seed,
    )
    lm = _model(args.model, args.device, args.dtype)
    report = train_sae(lm, cfg, args.out, force=args.force)
    print(json.dumps({"out": args.out, "tokens_seen": report["tokens_seen"], **report["heldout"]}, indent=2))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from .precompute.pipeline import PrecomputeConfig, precompute
    from .saes import load_sae

    PrecomputeConfig(context_len=args.context_len, tokens=args.tokens, batch_size=args.batch_size,
                     snapshot_tokens=args.snapshot_tokens)  # refuse bad numbers first
    if args.stop_with_parent:
        _stop_with_parent(args.stop_with_parent)
    sae_path = args.sae
    if sae_path == "demo":
        from .tools.demo import demo_sae_dir

        sae_path = str(demo_sae_dir())
    sae = load_sae(sae_path)
    lm = _model(args.model, args.device, args.dtype)
    if args.shards or args.latent_shards > 1 or args.ray:
        return _precompute_sharded(args, lm, sae, sae_path)
    manifest = precompute(
        lm, sae.to(lm.device), args.corpus, args.out, tokens=args.tokens, context_len=args.context_len,
        batch_size=args.batch_size, include_special=args.include_special, include_first=args.include_first,
        include_massive=args.include_massive,
        force=args.force, sae_path=sae_path, top_k=args.top_k, sample_contexts=args.sample_contexts,
        snapshot_tokens=args.snapshot_tokens, dfa_sources=args.dfa_sources,
    )
    return _print_run_summary(args.out, manifest)


def _precompute_sharded(args: argparse.Namespace, lm, sae, sae_path: str) -> int:
    from .precompute.distributed import precompute_sharded

    model = args.model if args.model != "demo" else lm.name
    manifest = precompute_sharded(
        model, sae_path, args.corpus, args.out, shards=args.shards or 1, latent_shards=args.latent_shards,
        ray_address=args.ray, device=args.device, dtype=args.dtype, force=args.force, merge=not args.no_merge,
        inputs=(lm, sae), tokens=args.tokens, context_len=args.context_len, batch_size=args.batch_size,
        include_special=args.include_special, include_first=args.include_first, include_massive=args.include_massive,
        top_k=args.top_k, sample_contexts=args.sample_contexts, dfa_sources=args.dfa_sources, snapshot_tokens=0,
    )
    if manifest is None:
        print(json.dumps({"out": args.out, "merged": False, "next": f"saescope merge {args.out}"}, indent=2))
        return 0
    return _print_run_summary(args.out, manifest)


def _print_run_summary(out: str, manifest: dict) -> int:
    keys = ("n_tokens", "l0", "explained_variance", "ce_loss_recovered", "n_dead")
    summary = {"out": out, **{k: manifest["metrics"].get(k) for k in keys}}
    summary["seconds"] = manifest["timings"]["total_seconds"]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .precompute.distributed import sharded_merge

    return _print_run_summary(args.run, sharded_merge(args.run, device=args.device, keep_states=args.keep_states))


def _stop_with_parent(parent: int) -> None:
    """End this process (as Ctrl-C would: nothing half-written is left) once ``parent``, the process that started
    it, is gone (it is no longer this one's parent), e.g. the demo's server stopped by a signal this child did not
    get. The pid is passed in, not read at start, so a parent that dies while this one is still importing counts."""
    import signal
    import threading
    import time

    # interrupt_main raises KeyboardInterrupt only while Python handles SIGINT; a child started by a process that
    # ignores SIGINT (a background job, nohup, a test runner) inherits the ignoring, and would never stop
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        import _thread

        _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True, name="stop-with-parent").start()


def cmd_export(args: argparse.Namespace) -> int:
    from .tools.export import NeuronpediaOptions, export_run

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
    from .tools.bench import format_report, run_bench

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
    from .tools.serve import serve

    _app_explainer(args)
    return serve(args.run, host=args.host, port=args.port, token=args.token, read_only=args.read_only)


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.serve import access_token, demo_runs_dir, ensure_demo_runs, port_is_free, serve, start_demo_runs

    names = [n.strip() for arg in args.sae for n in arg.split(",") if n.strip()] if args.sae else None
    opts = {"tokens": args.tokens, "force": args.force, "device": args.device, "dtype": args.dtype}
    if args.no_serve:
        if args.stop_with_parent:  # the background child of a serving `saescope demo`
            _stop_with_parent(args.stop_with_parent)
        runs = ensure_demo_runs(names, **opts)
        print(f"saescope demo: runs ready in {demo_runs_dir()}: {', '.join(r.name for r in runs)}")
        return 0
    if not port_is_free(args.host, args.port):  # before starting a background precompute
        raise ValueError(f"port {args.port} on {args.host} is already in use: pass another with --port")
    access_token(args.host, args.token)  # a token too short is refused before then too
    _app_explainer(args)
    from .tools.demo import demo_saes

    runs = start_demo_runs(names, **opts)
    return serve(runs, host=args.host, port=args.port, first=demo_saes(names)[0].run, token=args.token,
                 read_only=args.read_only)


CORPUS_HELP = ("text/jsonl file (.gz/.xz ok) or a directory of them; a Parquet/Arrow file or directory; or a Hugging Face "
               "dataset hf:NAME[:split][:column] (pip install 'saescope[hf]'); input_ids/tokens columns are used as stored")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description="Browse, measure and steer SAE features.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_opts(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--model", required=required, help="local dir, hub id, .gguf file, or 'demo'")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        p.add_argument(
            "--dtype", default="auto",
            help="auto (the fastest on this machine: see `saescope info --model`), float32, bfloat16 or float16",
        )

    p = sub.add_parser("info", help="describe an SAE and/or list a model's hook points")
    p.add_argument("path", nargs="?", help="SAE directory (SAELens or sparsify) or SAELens RELEASE/SAE_ID")
    model_opts(p, required=False)
    p.add_argument("--settings", action="store_true",
                   help="list every SAESCOPE_* environment variable, its value here (secrets hidden) and what it does")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-sae", help="train a TopK SAE on streamed activations")
    model_opts(p)
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

    p = sub.add_parser("precompute", help="precompute feature statistics into a run directory")
    model_opts(p)
    p.add_argument("--sae", required=True,
                   help="SAE directory (SAELens or sparsify), SAELens RELEASE/SAE_ID (e.g. gpt2-small-res-jb/"
                        "blocks.8.hook_resid_pre; cached by huggingface_hub), or 'demo'")
    p.add_argument("--corpus", required=True, help=CORPUS_HELP)
    p.add_argument("--out", required=True, help="run directory to write (manifest.json is written last)")
    p.add_argument("--tokens", type=int, help="corpus tokens to process (default: the whole corpus)")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="contexts per model forward")
    p.add_argument("--include-special", action="store_true", help="count special tokens (BOS/EOS/PAD...) in statistics")
    p.add_argument("--include-first", action="store_true", help="count position 0 (the attention sink) in statistics")
    p.add_argument(
        "--include-massive", action="store_true", help="count massive-activation tokens (norm > 10x median) in statistics"
    )
    p.add_argument("--top-k", type=int, default=20, help="top-activating contexts kept per latent")
    p.add_argument("--sample-contexts", type=int, default=32, help="held-out contexts for per-token rows and CE metrics")
    p.add_argument("--snapshot-tokens", type=int, default=16384,
                   help="publish a browsable snapshot after this many tokens, then at doubling counts (0: none)")
    p.add_argument("--dfa-sources", type=int, default=16,
                   help="attn.hook_z SAEs: (head, source token) contributions kept per top example (0: no head attribution)")
    p.add_argument("--force", action="store_true", help="replace a run of another model or SAE in --out")
    p.add_argument("--shards", type=int, metavar="N",
                   help="split the corpus into N shards run as Ray tasks (one GPU each where there are GPUs) and merge "
                        "them exactly; needs pip install 'saescope[ray]' (docs/scaling.md)")
    p.add_argument("--latent-shards", type=int, default=1, metavar="M",
                   help="also split the latents into M slices per shard: each task holds 1/M of the example reservoirs "
                        "(for SAEs of ~100k latents and more; every slice re-runs its shard's forward)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="join this Ray cluster (auto: the one RAY_ADDRESS or `ray start` on this node names; default: "
                        "a new local Ray instance, never a cluster found running)")
    p.add_argument("--no-merge", action="store_true", help="with --shards: leave the merge to `saescope merge`")
    p.add_argument("--stop-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("merge", help="merge a sharded precompute's finished tasks into its run (precompute --no-merge)")
    p.add_argument("run", help="the run directory given to precompute --shards as --out")
    p.add_argument("--device", help="device for the merge's model forwards (default: the job's)")
    p.add_argument("--keep-states", action="store_true", help="keep the task states after the run is written")
    p.set_defaults(func=cmd_merge)

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
    from .tools.demo import DEMO_SAES

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
    p.set_defaults(func=cmd_bench)

    from .interp.commands import add_parsers

    add_parsers(sub)
    from .eval.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"saescope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saescope {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
