"""The ``saescope precompute`` and ``saescope merge`` commands (registered by ``engine.cli``); the run's settings
are ``PrecomputeConfig``'s fields, flags derived from them (``engine.configs``) and passed whole."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .. import configs
from ..data.corpus import CORPUS_HELP
from ..model.commands import load_cli_model, model_arguments
from .pipeline import PrecomputeConfig


def cmd_precompute(args: argparse.Namespace) -> int:
    from ..saes import load_sae
    from .pipeline import precompute

    cfg = configs.from_args(PrecomputeConfig, args)  # every setting, checked before anything loads
    if args.stop_with_parent:
        stop_with_parent(args.stop_with_parent)
    sae_path = args.sae
    if sae_path == "demo":
        from ..saes.demo import demo_sae_dir

        sae_path = str(demo_sae_dir())
    sae = load_sae(sae_path)
    lm = load_cli_model(args.model, args.device, args.dtype)
    if args.shards or args.latent_shards > 1 or args.ray:
        return precompute_sharded_command(args, cfg, lm, sae, sae_path)
    manifest = precompute(lm, sae.to(lm.device), args.corpus, args.out, cfg, force=args.force, sae_path=sae_path)
    return print_run_summary(args.out, manifest)


def precompute_sharded_command(args: argparse.Namespace, cfg: PrecomputeConfig, lm, sae, sae_path: str) -> int:
    from .distributed import precompute_sharded

    model = args.model if args.model != "demo" else lm.name
    manifest = precompute_sharded(
        model, sae_path, args.corpus, args.out, shards=args.shards or 1, latent_shards=args.latent_shards,
        ray_address=args.ray, device=args.device, dtype=args.dtype, force=args.force, merge=not args.no_merge,
        inputs=(lm, sae), **{**dataclasses.asdict(cfg), "snapshot_tokens": 0},  # tasks publish no snapshots
    )
    if manifest is None:
        print(json.dumps({"out": args.out, "merged": False, "next": f"saescope merge {args.out}"}, indent=2))
        return 0
    return print_run_summary(args.out, manifest)


def print_run_summary(out: str, manifest: dict) -> int:
    keys = ("n_tokens", "l0", "explained_variance", "ce_loss_recovered", "n_dead")
    summary = {"out": out, **{k: manifest["metrics"].get(k) for k in keys}}
    summary["seconds"] = manifest["timings"]["total_seconds"]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .distributed import sharded_merge

    return print_run_summary(args.run, sharded_merge(args.run, device=args.device, keep_states=args.keep_states,
                                                     ray_address=args.ray))


def stop_with_parent(parent: int) -> None:
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


def add_parsers(sub) -> None:
    p = sub.add_parser("precompute", help="precompute feature statistics into a run directory")
    model_arguments(p)
    p.add_argument("--sae", required=True,
                   help="SAE directory (SAELens or sparsify), SAELens RELEASE/SAE_ID (e.g. gpt2-small-res-jb/"
                        "blocks.8.hook_resid_pre; cached by huggingface_hub), or 'demo'")
    p.add_argument("--corpus", required=True, help=CORPUS_HELP)
    p.add_argument("--out", required=True, help="run directory to write (manifest.json is written last)")
    configs.add_arguments(p, PrecomputeConfig, help={
        "tokens": "corpus tokens to process, in whole contexts (default: the whole corpus)",
        "snapshot_tokens": "publish a browsable snapshot after this many tokens, then at doubling counts (0: none)",
    })
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
    p.add_argument("--ray", metavar="ADDRESS", help="prepare the examples file by latent range in tasks of this Ray "
                   "cluster (`local`: a new local instance; `auto`: the one on this node) instead of threads here")
    p.set_defaults(func=cmd_merge)
