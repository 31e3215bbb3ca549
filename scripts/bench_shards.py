"""Sharded precompute on one machine: the overhead of two local Ray workers over one process, the merge time and
each worker's peak memory at real SAE widths (random TopK SAEs on the demo model).

    python scripts/bench_shards.py overhead [--tokens 65536] [--repeats 2]
    python scripts/bench_shards.py memory [--widths 16384 131072 1048576] [--tokens 8192]
    python scripts/bench_shards.py merge [--width 131072] [--tokens 8192]

Every measured step runs in its own process (peak RSS is that process' own); results print as JSON lines and, with
``--json PATH``, are written there. On a 2-core machine two workers cannot be faster than one process with two
threads: ``overhead`` reports what sharding costs (Ray start, a model load per worker, the merge), the single and
sharded runs alternating so drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"
CORPUS = ROOT / "data" / "corpus" / "heldout.jsonl.xz"
HOOK = "blocks.15.hook_resid_post"


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last. Adds the child's wall time."""
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - tick
    return out


PEAK = "import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"


def random_sae(path: Path, d_sae: int, k: int = 64) -> Path:
    """A random TopK SAE of ``d_sae`` latents on the demo model's layer 15 residual (bf16 safetensors)."""
    if (path / "cfg.json").is_file():
        return path
    import torch

    from engine.saes import SAEConfig, build_sae, sae_class

    cfg = SAEConfig(architecture="topk", d_in=576, d_sae=d_sae, hook_name=HOOK, k=k)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in sae_class("topk").tensor_shapes(cfg).items():
        state[name] = (torch.randn(shape, generator=gen, dtype=torch.float32) * (0.05 if name.startswith("W") else 0.01)
                       ).to(torch.bfloat16)
    build_sae(cfg, state, dtype=torch.bfloat16).save(path)
    return path


def overhead(args) -> list[dict]:
    sae = ROOT / "data" / "demo_sae"
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        def run(shards: int | None) -> dict:
            out = Path(tmp) / f"run-{shards or 'single'}"
            extra = f", '--shards', '{shards}'" if shards else ""
            code = (f"import json, sys; from engine.cli import main; "
                    f"sys.argv = ['saescope', 'precompute', '--model', '{MODEL}', '--sae', '{sae}', '--corpus', '{CORPUS}', "
                    f"'--out', '{out}', '--tokens', '{args.tokens}', '--snapshot-tokens', '0', '--force'{extra}]\n"
                    f"import contextlib, io\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf): main()\n"
                    f"m = json.load(open('{out}/manifest.json'))\n{PEAK}\n"
                    f"print(json.dumps({{'timings': m['timings'], 'n_tokens': m['corpus']['n_tokens'], 'peak_rss_mb': peak, "
                    f"'tasks': (m.get('sharding') or {{}}).get('tasks')}}))")
            return child(code)

        for rep in range(args.repeats):
            order = (None, 2) if rep % 2 == 0 else (2, None)
            got = {shards: run(shards) for shards in order}
            single, sharded = got[None], got[2]
            t1, t2 = single["timings"], sharded["timings"]
            results.append({
                "bench": "overhead", "repeat": rep, "tokens": single["n_tokens"],
                "single_wall_s": round(single["wall_seconds"], 2), "sharded_wall_s": round(sharded["wall_seconds"], 2),
                "wall_ratio": round(sharded["wall_seconds"] / single["wall_seconds"], 3),
                "single_pass_s": round(t1["main_pass_seconds"], 2), "sharded_pass_s": round(t2["main_pass_seconds"], 2),
                "pass_ratio": round(t2["main_pass_seconds"] / t1["main_pass_seconds"], 3),
                "single_tok_per_s": round(t1["tokens_per_second"]), "sharded_tok_per_s": round(t2["tokens_per_second"]),
                "merge_s": round(t2.get("merge_seconds", 0.0), 2),
                "worker_tok_per_s": [round(t["tokens_per_second"]) for t in sharded["tasks"] or []],
                "worker_peak_rss_mb": [round(t["peak_rss_mb"]) for t in sharded["tasks"] or []],
                "single_peak_rss_mb": round(single["peak_rss_mb"]), "cpu": cpu_model(), "cores": os.cpu_count(),
            })
            print(json.dumps(results[-1]), flush=True)
    return results


def plan_code(out: Path, sae: Path, tokens: int, shards: int, latent_shards: int) -> str:
    return (f"import json\nfrom engine.precompute.distributed import plan\n"
            f"job, _ = plan('{MODEL}', '{sae}', '{CORPUS}', '{out}', shards={shards}, latent_shards={latent_shards}, "
            f"tokens={tokens}, force=True)\nprint(json.dumps({{'tasks': len(job.tasks())}}))")


def task_code(out: Path, index: int) -> str:
    return (f"import json, time\nfrom engine.precompute.shards import run_task, Job, load_inputs, shards_dir\n"
            f"{PEAK}\nbase_rss = peak\njob = Job.load(shards_dir('{out}'))\ninputs = load_inputs(job)\n"
            f"{PEAK}\nloaded_rss = peak\ns = run_task('{out}', {index}, inputs=inputs)\n{PEAK}\n"
            f"print(json.dumps({{**s, 'loaded_rss_mb': loaded_rss, 'peak_rss_mb': peak}}))")


def memory(args) -> list[dict]:
    results = []
    for width in args.widths:
        latent_shards = max(1, width // args.latents_per_task)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            sae = random_sae(Path(tmp) / "sae", width)
            out = Path(tmp) / "run"
            child(plan_code(out, sae, args.tokens, 1, latent_shards))
            task = child(task_code(out, 0))
            state_mb = (out / ".shards" / "task-0000.pt").stat().st_size / 2**20
        slots = 20 + 2 * 10 * 5
        reservoir_mb = width / latent_shards * slots * (128 * 2 + 4 + 4 + 8 + 2) / 2**20
        results.append({
            "bench": "memory", "d_sae": width, "latent_shards": latent_shards, "latents_per_task": width // latent_shards,
            "tokens": args.tokens, "peak_rss_mb": round(task["peak_rss_mb"]),
            "model_and_sae_rss_mb": round(task["loaded_rss_mb"]), "state_file_mb": round(state_mb),
            "reservoir_mb_computed": round(reservoir_mb), "task_seconds": round(task["seconds"], 1),
            "tok_per_s": round(task["tokens_per_second"]), "dtype": task["dtype"], "cpu": cpu_model(),
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def merge(args) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        sae = random_sae(Path(tmp) / "sae", args.width)
        out = Path(tmp) / "run"
        child(plan_code(out, sae, args.tokens, 2, 1))
        tasks = [child(task_code(out, i)) for i in range(2)]
        code = (f"import json\nfrom engine.precompute.distributed import sharded_merge\n"
                f"m = sharded_merge('{out}', progress=False)\n{PEAK}\n"
                f"print(json.dumps({{'timings': m['timings'], 'peak_rss_mb': peak}}))")
        merged = child(code)
    t = merged["timings"]
    result = {
        "bench": "merge", "d_sae": args.width, "shards": 2, "tokens": args.tokens,
        "merge_wall_s": round(merged["wall_seconds"], 1), "merge_s": round(t["merge_seconds"], 1),
        "ce_sample_s": round(t.get("ce_sample_seconds", 0), 1), "features_s": round(t.get("features_seconds", 0), 1),
        "write_s": round(t.get("write_seconds", 0), 1), "stats_merge_s": round(t.get("merge_stats_seconds", 0), 2),
        "merge_peak_rss_mb": round(merged["peak_rss_mb"]), "worker_peak_rss_mb": [round(x["peak_rss_mb"]) for x in tasks],
        "cpu": cpu_model(),
    }
    print(json.dumps(result), flush=True)
    return [result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["overhead", "memory", "merge"])
    parser.add_argument("--tokens", type=int, help="tokens per run (overhead: 65536; memory and merge: 8192)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 131072, 1048576])
    parser.add_argument("--latents-per-task", type=int, default=131072,
                        help="memory: latent slices so that a task holds at most this many latents")
    parser.add_argument("--width", type=int, default=131072)
    parser.add_argument("--tmp", default=None, help="folder for the runs and random SAEs (GBs at 1M latents)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.tokens = args.tokens or (65536 if args.bench == "overhead" else 8192)
    if not MODEL.is_dir():
        sys.exit(f"the demo model is missing at {MODEL}: run `saescope demo` or `make demo` once")
    results = {"overhead": overhead, "memory": memory, "merge": merge}[args.bench](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
