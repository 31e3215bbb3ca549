"""``saescope bench``: precompute against a bare forward, query latency at 1M latents, memory at two corpus lengths.

Every measurement is a ratio or a latency taken in this one run on this machine. The precompute runs go in
child processes; each reports the peak resident memory while its precompute runs (sampled, so loading the
model, which peaks higher on some machines, does not hide it; the loaded model itself counts). Each child also
times the bare model forward up to the hook on the very contexts its precompute read (tokenized beforehand, so
tokenizing counts against precompute only), once before and once after the precompute, and uses the mean.
The live measurements (prompt lens, steering: ``engine.tools.bench_live``) run in the larger child; a failure
there, or a ratio that is not a positive finite number, fails the bench.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_SAE = {"d_sae": 256, "k": 8, "hook": "blocks.1.hook_resid_post"}
GPT2_SAE = {"d_sae": 6144, "k": 32, "hook": "blocks.6.hook_resid_pre"}
"""The GPT-2-small-shaped random model's SAE: SAEDashboard's comparison shape (TopK, 6,144 latents) at the middle
of the 12 layers."""
MODELS = ("demo", "gpt2", "tiny")


def demo_available() -> bool:
    """True when the converted demo model and the trained demo SAE are both on disk."""
    from .demo import demo_model_dir, demo_sae_dir

    return (demo_model_dir() / "config.json").is_file() and (demo_sae_dir() / "cfg.json").is_file()


def random_topk(lm, spec: dict, seed: int = 0):
    """A TopK SAE of ``spec`` (``d_sae``, ``k``, ``hook``) with unit-norm random decoder rows and a tied encoder."""
    import torch

    from ..saes import SAEConfig, build_sae

    gen = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=spec["d_sae"], k=spec["k"], hook_name=spec["hook"])
    W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    state = {"W_dec": W_dec, "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(cfg.d_sae), "b_dec": torch.zeros(cfg.d_in)}
    return build_sae(cfg, state).to(device=lm.device)


def _load(which: str):
    """(model, SAE, description) for ``demo``, ``gpt2`` (GPT-2-small-shaped, random) or ``tiny``; dtype ``auto``."""
    from ..model.loading import load_model

    if which == "demo":
        from ..saes import load_sae
        from .demo import demo_model_dir, demo_sae_dir

        lm = load_model(demo_model_dir(), device="auto", dtype="auto")
        sae = load_sae(demo_sae_dir(), device=lm.device)
        return lm, sae, f"demo: {demo_model_dir().name} + {demo_sae_dir().name} ({sae.cfg.d_sae} latents at {sae.cfg.hook_name})"
    from ..model.loading import resolve_device
    from ..model.machine import choose_dtype
    from ..model.tiny import tiny_model

    device = resolve_device("auto")
    if which == "gpt2":
        choice = choose_dtype(device, 768)
        lm = tiny_model("gpt2", d_model=768, n_layers=12, n_heads=12, vocab_size=50257, n_positions=1024,
                        dtype=choice.torch_dtype)
        lm.dtype_choice = choice
        lm.model.to(device)
        lm.device = device
        sae = random_topk(lm, GPT2_SAE)
        return lm, sae, (f"gpt2: random GPT-2-small-shaped model (12 layers, d_model 768, vocab 50,257) + random topk "
                         f"SAE ({GPT2_SAE['d_sae']} latents, k {GPT2_SAE['k']}, at {GPT2_SAE['hook']})")
    lm = tiny_model("llama")
    sae = random_topk(lm, TINY_SAE)
    return lm, sae, f"tiny: random 2-layer llama (d_model {lm.d_model}) + random topk SAE ({TINY_SAE['d_sae']} latents)"


def forward_seconds(lm, hook: str, contexts: list[list[int]], batch_size: int) -> float:
    """Seconds of the bare forward up to ``hook`` over ``contexts`` in batches (CUDA work included)."""
    import torch

    from ..data.activations import batched

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)  # CUDA kernels run queued
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batched(contexts, batch_size):
            lm.capture(ids, hook)
    sync()
    return time.perf_counter() - start


class PeakRSS:
    """Highest resident set size while the block runs, sampled every 20 ms from ``/proc/self/statm``
    (so the model load before it does not count); falls back to the process high-water mark elsewhere."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            try:
                with open("/proc/self/statm") as f:
                    self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * page)
            except OSError:
                self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child_main(argv: list[str]) -> None:
    """One precompute measurement in a fresh process; prints a JSON line."""
    import itertools

    from ..data.corpus import iter_contexts
    from ..precompute.pipeline import precompute

    which, corpus = argv[0], argv[1]
    tokens, context_len, batch_size, live = int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "1"
    lm, sae, description = _load(which)
    hook = sae.cfg.hook_name
    contexts = list(itertools.islice(iter_contexts(lm.tokenizer, corpus, context_len), tokens // context_len))
    forward_seconds(lm, hook, contexts[:batch_size], batch_size)  # warm-up
    before = forward_seconds(lm, hook, contexts, batch_size)
    with tempfile.TemporaryDirectory(prefix="saescope-bench-") as tmp, PeakRSS() as rss:
        manifest = precompute(lm, sae, corpus, Path(tmp) / "run", tokens=len(contexts) * context_len,
                              context_len=context_len, batch_size=batch_size, progress=False)
    peak = rss.peak_mb
    after = forward_seconds(lm, hook, contexts, batch_size)
    out = {"model": description, "tokens": len(contexts) * context_len, "forward_seconds": (before + after) / 2,
           "forward_seconds_before_after": [before, after], "timings": manifest["timings"], "peak_rss_mb": peak,
           "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
           "dtype_choice": lm.dtype_choice.to_dict() if lm.dtype_choice else None}
    if live:
        out["live"] = _live(lm, sae)
    print(json.dumps(out))


class LiveBenchError(RuntimeError):
    """The prompt-lens or steering measurement failed, or gave a figure that is not a positive finite number."""


def _live(lm, sae) -> dict:
    """Prompt-lens and steering ratios from ``engine.tools.bench_live``; any failure fails the bench."""
    from . import bench_live

    results: dict = {}
    for what, name in (("prompt lens", "lens_over_forward"), ("steering", "steering_over_baseline")):
        try:
            results.update(getattr(bench_live, name)(lm, sae))
        except Exception as err:
            raise LiveBenchError(
                f"bench: the {what} measurement (engine.tools.bench_live.{name}) failed on {lm.name}: "
                f"{type(err).__name__}: {err}"
            ) from err
    try:
        bench_live.check_live(results)
    except ValueError as err:
        raise LiveBenchError(f"bench: the live measurements on {lm.name} are not usable: {err}") from err
    return results


def _child(which: str, corpus: str, tokens: int, context_len: int, batch_size: int, live: bool) -> dict:
    code = "import sys; from engine.tools.bench import child_main; child_main(sys.argv[1:])"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    args = [which, corpus, str(tokens), str(context_len), str(batch_size), "1" if live else "0"]
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"bench child ({which}, {tokens} tokens) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def p95_ms(fn, n: int, warmup: int = 20) -> tuple[float, float]:
    times = []
    for i in range(n + warmup):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    ms = np.array(times[warmup:]) * 1e3
    return float(np.percentile(ms, 95)), float(np.median(ms))


def query_bench(store_dir: Path, n: int = 300, **store_params) -> dict:
    """Feature-page and top-50-by-density latency over the cached synthetic store (built on first use)."""
    from ..run.store import RunStore
    from .synthetic import DEFAULTS, ensure_bench_store

    params = {**DEFAULTS, **store_params}
    tick = time.perf_counter()
    ensure_bench_store(store_dir, **params)
    prepared = time.perf_counter() - tick
    rng = np.random.default_rng(0)
    with RunStore.open(store_dir) as store:
        n_features = store.n_features()
        ids = rng.integers(0, n_features, n + 20)
        offsets = rng.integers(0, 500, n + 20)
        feature_p95, feature_median = p95_ms(lambda i: store.feature(int(ids[i])), n)
        topn_p95, topn_median = p95_ms(lambda i: store.top_features(sort_by="density", limit=50, offset=int(offsets[i])), n)
    return {
        "feature_query_p95_ms": feature_p95,
        "feature_query_median_ms": feature_median,
        "topn_query_p95_ms": topn_p95,
        "topn_query_median_ms": topn_median,
        "store": {"path": str(store_dir), "latents": n_features, "examples_per_latent": params["n_examples"],
                  "tokens_per_example": params["width"], "prepare_seconds": round(prepared, 1)},
    }


def machine_facts() -> dict:
    """Where the bench ran: CPU model and ISA flags, threads, torch, and this machine's fp32/bf16 matmul times."""
    import torch

    from ..model.machine import choose_cpu_dtype, cpu_facts

    facts = cpu_facts().to_dict()
    cpu = choose_cpu_dtype(576)
    facts.update(cpu_dtype=cpu.dtype, cpu_dtype_reason=cpu.reason, matmul_fp32_ms=cpu.fp32_ms, matmul_bf16_ms=cpu.bf16_ms,
                 fp32_over_bf16_time=cpu.bf16_speedup, cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return facts


def run_bench(*, model: str | None = None, tiny: bool = False, tokens: int | None = None, corpus: str | Path | None = None,
              store_dir: str | Path | None = None, queries: bool = True, live: bool = True,
              search_latents: int = 1_000_000) -> dict:
    """All measurements as one dict (see the module docstring). ``model``: ``demo`` (default when present),
    ``gpt2`` or ``tiny``."""
    from ..assets import data_dir

    if model is not None and model not in MODELS:
        raise ValueError(f"bench model must be one of {', '.join(MODELS)}, got {model!r}")
    which = model or ("tiny" if tiny or not demo_available() else "demo")
    if which == "demo" and not demo_available():
        raise ValueError("the demo model or SAE is not on disk: run `saescope demo --no-serve` first, or pick --model gpt2/tiny")
    corpus = str(corpus or data_dir() / "corpus" / "heldout.jsonl.xz")
    context_len, batch_size = 128, 16
    large = tokens or {"demo": 65_536, "gpt2": 65_536, "tiny": 262_144}[which]
    small = max(context_len * batch_size, large // 4)
    runs = {n: _child(which, corpus, n, context_len, batch_size, live=(n == large and live)) for n in (small, large)}
    main = runs[large]
    timings = main["timings"]
    result = {
        "model": main["model"],
        "model_source": which if model or tiny or which == "demo" else "tiny (demo model or demo SAE not found)",
        "machine": machine_facts(),
        "device": main["device"],
        "dtype": main["dtype"],
        "dtype_choice": main["dtype_choice"],
        "tokens": large,
        "forward_seconds": main["forward_seconds"],
        "main_pass_seconds": timings["main_pass_seconds"],
        "total_seconds": timings["total_seconds"],
        "precompute_over_forward": timings["main_pass_seconds"] / main["forward_seconds"],
        "total_over_forward": timings["total_seconds"] / main["forward_seconds"],
        "ce_sample_seconds": timings["ce_sample_seconds"],
        "finalize_seconds": timings["features_seconds"] + timings["write_seconds"],
        "snapshot_seconds": timings["snapshot_seconds"],
        "snapshots": timings["snapshots"],
        "peak_rss_mb": {str(n): round(r["peak_rss_mb"], 1) for n, r in runs.items()},
        "rss_growth_mb": round(runs[large]["peak_rss_mb"] - runs[small]["peak_rss_mb"], 1),
        "process_peak_rss_mb": {str(n): round(r["process_peak_rss_mb"], 1) for n, r in runs.items()},
    }
    if "live" in main:
        result["live"] = main["live"]
    if queries:
        from .bench_search import refresh_bench, search_bench

        result.update(query_bench(Path(store_dir or data_dir() / "cache" / "bench_store")))
        result["search"] = search_bench(search_latents)
        result["explanation_refresh"] = refresh_bench(min(search_latents, 262_144))
    return result


def format_report(result: dict) -> str:
    """Human-readable summary with the targets."""
    m = result["machine"]
    flags = " ".join(m["flags"]) or "no listed ISA flags"
    lines = [f"machine: {m['model']} ({flags}; {m['threads']} threads; torch {m['torch']})"
             f"  fp32/bf16 matmul time {m['fp32_over_bf16_time'] or float('nan'):.2f}",
             f"model: {result['model']}  [{result['model_source']}; {result['device']}, {result['dtype']}]",
             f"precompute / forward ({result['tokens']:,} tokens): main pass {result['precompute_over_forward']:.3f}, "
             f"whole run {result['total_over_forward']:.3f}  (target <= 1.3)",
             f"  forward {result['forward_seconds']:.2f} s, main pass {result['main_pass_seconds']:.2f} s, "
             f"total {result['total_seconds']:.2f} s",
             f"  CE sample {result['ce_sample_seconds']:.2f} s; features + writing {result['finalize_seconds']:.2f} s; "
             f"{result['snapshots']} snapshots {result['snapshot_seconds']:.2f} s",
             "peak RSS: " + ", ".join(f"{mb:.0f} MB at {int(n):,} tokens" for n, mb in result["peak_rss_mb"].items())
             + f"  (growth {result['rss_growth_mb']:+.0f} MB)"]
    if "feature_query_p95_ms" in result:
        store = result["store"]
        lines.append(f"feature page p95: {result['feature_query_p95_ms']:.1f} ms "
                     f"(median {result['feature_query_median_ms']:.1f}); "
                     f"top-50 by density p95: {result['topn_query_p95_ms']:.1f} ms "
                     f"(median {result['topn_query_median_ms']:.1f})  "
                     f"(target <= 20 ms; {store['latents']:,} latents x {store['examples_per_latent']} examples x "
                     f"{store['tokens_per_example']} tokens)")
    if "search" in result:
        from .bench_search import format as format_search

        lines += format_search(result["search"]) + ["  (target: p95 <= 50 ms at 1M latents)"]
    if "explanation_refresh" in result:
        from .bench_search import format_refresh

        lines += format_refresh(result["explanation_refresh"])
    for key, value in result.get("live", {}).items():
        lines.append(f"live {key}: {value:.3f}" if isinstance(value, float) else f"live {key}: {value}")
    return "\n".join(lines)
