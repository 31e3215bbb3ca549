"""Wide SAEs end to end, and the kernels that dominate them, measured side by side.

``wide_run``: a random TopK SAE of ``d_sae`` latents (k 64, unit-norm random decoder rows) at the demo SAE's hook
of the demo model, ``saescope precompute`` on the demo's held-out corpus to a browsable run, in a fresh process:
wall time and its parts, the first snapshot's time, peak RSS, the decoder neighbours' method and recall@n, and the
feature page's p95 latency on the finished run, and what the page computes on demand for a wide run (a latent's
neighbours and logit effects). SAEs wider than ``SLICE_LATENTS`` run with latent slices. A width whose child fails
(killed for memory, say) is recorded as ``failed`` and the others still run.

``kernels``: in one process, alternating, on this machine's dtype: ``torch.topk`` against ``wide_topk`` over
``d_sae`` latents; the IVF neighbour search's CPU time and recall on random unit rows; the example reservoirs'
activation buffer with whole contexts against 32-token windows. (A bf16 IVF search and per-list probing were
tried and measured: 1.1x and 1.5-1.7x faster, but per-list probing lost a third of the recall, 0.61 -> 0.40 on
the demo decoder, and bf16 gained too little to keep.)

``saescope bench --wide 262144,1048576`` runs both and prints one JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDE_TOKENS = {262_144: 65_536, 1_048_576: 16_384}
"""The issue's settings: tokens precomputed per width (others: 16,384)."""


SLICE_LATENTS = 262_144
"""Widest latent slice one process holds: wider SAEs run as a sharded precompute with ``ceil(d_sae / SLICE_LATENTS)``
latent slices, one after another in this process (``runner="inline"``), as docs/scaling.md advises on a CPU (the
reservoirs of 1M latents, ~10 GB with 32-token windows, do not fit beside the rest in 24 GB)."""


def wide_child(argv: list[str]) -> None:
    """One wide precompute in a fresh process; prints a JSON line."""
    import torch

    from ..model.loading import load_model
    from ..precompute.distributed import precompute_sharded
    from ..precompute.features import decoder_norms, latent_logit_effects, latent_neighbors_of
    from ..precompute.pipeline import precompute
    from ..run.store import RunStore
    from .bench import PeakRSS, p95_ms, random_topk
    from .demo import demo_model_dir, demo_sae_dir

    d_sae, tokens, corpus = int(argv[0]), int(argv[1]), argv[2]
    lm = load_model(demo_model_dir(), device="auto", dtype="auto")
    hook = json.loads((demo_sae_dir() / "cfg.json").read_text())["metadata"]["hook_name"]
    sae = random_topk(lm, {"d_sae": d_sae, "k": 64, "hook": hook})
    slices = -(-d_sae // SLICE_LATENTS)
    with tempfile.TemporaryDirectory(prefix="saescope-wide-") as tmp:
        started = time.perf_counter()
        with PeakRSS() as rss:
            if slices == 1:
                manifest = precompute(lm, sae, corpus, Path(tmp) / "run", tokens=tokens, progress=False)
            else:
                sae.save(Path(tmp) / "sae")  # the job names its SAE folder
                manifest = precompute_sharded(str(demo_model_dir()), str(Path(tmp) / "sae"), corpus, Path(tmp) / "run",
                                              shards=1, latent_shards=slices, runner="inline", progress=False,
                                              inputs=(lm, sae), tokens=tokens)
                assert manifest is not None
        wall = time.perf_counter() - started
        rng = np.random.default_rng(0)
        ids = rng.integers(0, d_sae, 220)
        with RunStore.open(Path(tmp) / "run") as store:
            p95, median = p95_ms(lambda i: store.feature(int(ids[i])), 200)
        # what the feature page adds for a latent the run left to it (once per latent: then cached)
        on_demand = {}
        if manifest["neighbors"]["method"] == "on_demand":
            norms = decoder_norms(sae)  # kept by the app between pages
            on_demand["neighbors_p95_ms"], on_demand["neighbors_median_ms"] = p95_ms(
                lambda i: latent_neighbors_of(sae, int(ids[i]), norms=norms), 40)
        if manifest["settings"]["logits_on_demand_above"] < d_sae:
            on_demand["logits_p95_ms"], on_demand["logits_median_ms"] = p95_ms(
                lambda i: latent_logit_effects(lm, sae, int(ids[i])), 40)
    print(json.dumps({
        "d_sae": d_sae, "tokens": manifest["corpus"]["n_tokens"], "wall_seconds": wall, "timings": manifest["timings"],
        "peak_rss_mb": rss.peak_mb, "neighbors": manifest["neighbors"], "example_window": manifest["corpus"]["example_window"],
        "feature_page_p95_ms": p95, "feature_page_median_ms": median, "on_demand": on_demand, "latent_slices": slices,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }))


def wide_run(d_sae: int, tokens: int | None = None, corpus: str | Path | None = None) -> dict:
    """``wide_child`` in a fresh process (its peak memory is its own)."""
    from ..assets import data_dir

    corpus = str(corpus or data_dir() / "corpus" / "heldout.jsonl.xz")
    tokens = tokens or WIDE_TOKENS.get(d_sae, 16_384)
    code = "import sys; from engine.tools.bench_wide import wide_child; wide_child(sys.argv[1:])"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(d_sae), str(tokens), corpus], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:  # recorded, so the other widths' figures are kept
        why = f"killed by signal {-result.returncode}" if result.returncode < 0 else f"exit status {result.returncode}"
        if result.returncode == -9:
            why += " (the kernel's out-of-memory killer, most likely)"
        out = {"d_sae": d_sae, "tokens": tokens, "failed": why, "seconds": time.perf_counter() - started,
               "stderr_tail": result.stderr[-3000:]}
    else:
        out = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"bench --wide: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def _cpu_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn`` (all threads: robust to other jobs on the machine, unlike wall time)."""
    times = []
    for _ in range(repeats):
        tick = time.process_time()
        fn()
        times.append(time.process_time() - tick)
    return float(np.median(times))


def kernels(d_sae: int = 262_144, d_in: int = 576, tokens: int = 64, k: int = 64, repeats: int = 5,
            neighbor_rows: int = 131_072, dtype: str = "auto") -> dict:
    """The wide run's kernels side by side, alternating (CPU seconds; see the module docstring)."""
    import torch

    from ..analysis.ivf import ivf_neighbors, recall_at_n
    from ..model.loading import dtype_choice
    from ..saes.topk import wide_topk

    run_dtype = dtype_choice(dtype, torch.device("cpu"), d_in).torch_dtype  # auto: what this CPU was measured fastest at
    gen = torch.Generator().manual_seed(0)
    pre = (torch.randn(tokens, d_in, generator=gen) @ torch.randn(d_in, d_sae, generator=gen)).to(run_dtype)
    plain, wide = [], []
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits both
        plain.append(_cpu_seconds(lambda: pre.topk(k, dim=-1, sorted=False), 1))
        wide.append(_cpu_seconds(lambda: wide_topk(pre, k), 1))
    assert torch.equal(wide_topk(pre, k)[0].sort(-1).values, pre.topk(k, dim=-1).values.sort(-1).values)
    dirs = torch.randn(neighbor_rows, d_in, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    tick = time.process_time()
    found = ivf_neighbors(dirs, 10)
    ivf = {"cpu_seconds": time.process_time() - tick, "recall_at_10": recall_at_n(dirs, found.ids, 256).value,
           "pairs_compared": found.compared}
    slots, context_len = 120, 128
    return {
        "dtype": str(run_dtype).removeprefix("torch."), "d_sae": d_sae, "tokens_per_call": tokens, "k": k,
        "topk_cpu_seconds": float(np.median(plain)), "wide_topk_cpu_seconds": float(np.median(wide)),
        "topk_over_wide_topk": float(np.median(plain) / np.median(wide)),
        "ivf_rows": neighbor_rows, "ivf": ivf,
        "reservoir_acts_gb": {"whole_contexts": d_sae * slots * context_len * 2 / 1e9, "window_32": d_sae * slots * 32 * 2 / 1e9},
    }


def wide_bench(widths: list[int], tokens: int | None = None, corpus: str | Path | None = None, **kernel_args) -> dict:
    """The kernels at the widest width, then one ``wide_run`` per width."""
    from .bench import machine_facts

    return {"machine": machine_facts(), "kernels": kernels(max(widths), **kernel_args),
            "runs": [wide_run(w, tokens, corpus) for w in widths]}
