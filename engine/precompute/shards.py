"""Sharded precompute: a job of tasks, each one shard of the corpus (and optionally a slice of the latents), whose
partial states are saved in the run's staging area and merged exactly by ``merge.merge_run``.

The plan is deterministic. The corpus' contexts (numbered as a single-process run numbers them) are cut into
``shards`` contiguous ranges on batch boundaries, so every batch, and with it the per-batch massive-token rule,
is the batch a single process sees. With ``latent_shards`` > 1 each range is run once per slice of the latents:
every task encodes with the whole SAE (a TopK needs all latents) but keeps the statistics and examples of its slice
only, so a worker holds ``1 / latent_shards`` of the reservoirs (the memory that grows with the SAE). Token-level
state (reconstruction, dark matter, the context sample, the contexts file) is kept by the slice starting at latent 0.

Seed rule: shard ``s`` draws its random numbers (quantile keys, the context sample) from ``shard_seed(seed, s)``,
which is ``seed`` itself for shard 0, so a one-shard run repeats the single-process run exactly; the merge draws
from ``numpy.random.default_rng(seed)``.

Layout, in ``<run>/.shards/``: ``job.json`` (the plan), then per finished task ``task-NNNN.safetensors`` (its state:
tensors and typed JSON, no pickle, see ``statefile``) and,
for the primary slice, ``task-NNNN.contexts.parquet``. Each is written under a temporary name and renamed, the
state last, so a task's state exists only when the task is complete: a re-run of the same job redoes only the
tasks without one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.corpus import iter_contexts
from ..run import parquet, rundir
from . import statefile

JOB = "job.json"
JOB_VERSION = 2
"""2: task states in safetensors (``statefile``); a job of version 1 (pickled states) is planned again."""


def shard_seed(seed: int, shard: int) -> int:
    """The seed of token shard ``shard``: ``seed`` for shard 0, else a hash of both (independent streams)."""
    if shard == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"saescope-shard:{seed}:{shard}".encode()).digest()[:8], "little") >> 1


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``parts`` contiguous ranges of near-equal size on multiples of ``align`` (the last
    range takes the remainder); ranges may be empty when there are fewer units than parts."""
    units = -(-n // align)
    bounds = [min(n, (units * i // parts) * align) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class Task:
    index: int
    shard: int
    contexts: tuple[int, int]
    latents: tuple[int, int]
    primary: bool
    """Keeps the token-level state (the latent slice starting at 0)."""


@dataclass
class Job:
    """A sharded precompute: what to load, the settings, the plan. Saved as ``<run>/.shards/job.json``."""

    model: str
    device: str
    dtype: str
    sae: str
    corpus: str
    config: dict
    n_contexts: int
    shards: int
    latent_shards: int
    d_sae: int
    identity: dict
    version: int = JOB_VERSION

    def tasks(self) -> list[Task]:
        ranges = split(self.n_contexts, self.shards, self.config["batch_size"])
        slices = split(self.d_sae, self.latent_shards)
        return [Task(s * len(slices) + j, s, ctx, lat, primary=j == 0)
                for s, ctx in enumerate(ranges) for j, lat in enumerate(slices)]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{JOB}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, folder / JOB)

    @classmethod
    def load(cls, folder: Path) -> Job:
        path = folder / JOB
        if not path.is_file():
            raise FileNotFoundError(f"{folder.parent} holds no sharded precompute ({path} is missing): run "
                                    "`saescope precompute --shards N` first")
        raw = json.loads(path.read_text())
        if raw.get("version") != JOB_VERSION:
            raise ValueError(f"{path} is a job of version {raw.get('version')}, this saescope reads {JOB_VERSION}")
        return cls(**raw)


def shards_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / rundir.SHARDS


def state_path(folder: Path, task: Task) -> Path:
    return folder / f"task-{task.index:04d}.safetensors"


def contexts_path(folder: Path, task: Task) -> Path:
    return folder / f"task-{task.index:04d}.contexts.parquet"


def done(folder: Path, job: Job) -> list[Task]:
    """The job's tasks whose state is saved."""
    return [t for t in job.tasks() if state_path(folder, t).is_file()]


def prepare_job(out: str | Path, job: Job) -> Path:
    """The staging folder for ``job`` in run directory ``out``: kept (with its finished tasks) when it holds the
    same job, emptied otherwise."""
    folder = shards_dir(out)
    try:
        same = Job.load(folder) == job
    except (FileNotFoundError, ValueError, TypeError, json.JSONDecodeError):
        same = False
    if not same and folder.exists():
        for path in folder.iterdir():
            path.unlink()
    job.save(folder)
    return folder


def load_model_and_sae(model: str, sae_path: str, device: str = "auto", dtype: str = "auto"):
    """A model and an SAE from their paths (or hub names), the SAE on the model's device."""
    from ..model.loading import load_model
    from ..saes import load_sae

    lm = load_model(model, device=device, dtype=dtype)
    return lm, load_sae(sae_path).to(lm.device)


def load_inputs(job: Job):
    """The job's model and SAE, loaded as a worker (or the merge) needs them, checked against the job's identity."""
    lm, sae = load_model_and_sae(job.model, job.sae, job.device, job.dtype)
    found = {"model_hash": rundir.model_fingerprint(lm), "sae_hash": rundir.sae_fingerprint(sae)}
    if found != job.identity:
        raise ValueError(f"the model or SAE changed since the job was planned ({found} != {job.identity}); "
                         "run `saescope precompute --shards N` again")
    return lm, sae


@torch.inference_mode()
def run_task(out: str | Path, index: int, report: Callable[[int, int, float], None] | None = None, inputs=None) -> dict:
    """Run task ``index`` of the job in run directory ``out`` and save its state; returns the task's summary.

    ``report(index, tokens, seconds)`` is called after every batch (a progress bar); ``inputs`` is the loaded
    ``(lm, sae)`` when the caller has them (else they are loaded from the job)."""
    from ..analysis.interventions import compute_copy
    from .pipeline import PrecomputeConfig, activation_batches, check_inputs, head_attribution, new_state, step

    folder = shards_dir(out)
    job = Job.load(folder)
    task = job.tasks()[index]
    started = time.perf_counter()
    lm, sae = inputs if inputs is not None else load_inputs(job)
    cfg = PrecomputeConfig(**job.config)
    hook = check_inputs(lm, sae, job.corpus, cfg.context_len)
    run_sae = compute_copy(sae, lm)
    heads, note = head_attribution(lm, sae, hook, cfg)
    latents = range(*task.latents) if job.latent_shards > 1 else None
    state = new_state(run_sae, cfg, heads, note, latents=latents, seed=shard_seed(cfg.seed, task.shard))
    lo, hi = task.contexts
    contexts = itertools.islice(iter_contexts(lm.tokenizer, job.corpus, cfg.context_len), lo, hi)
    ctx_file = parquet.ContextWriter(folder / f".task-{task.index:04d}.contexts.tmp.parquet") if task.primary else None
    tick = time.perf_counter()
    tokens = 0
    for batch in activation_batches(lm, run_sae, hook, contexts, cfg, heads):
        tokens += step(state, run_sae, batch, lo + state.n_contexts, ctx_file, latents=latents)
        if report is not None:
            report(task.index, tokens, time.perf_counter() - tick)
    seconds = time.perf_counter() - tick
    if state.n_contexts != hi - lo:
        raise RuntimeError(f"task {task.index} read {state.n_contexts} contexts of the corpus, expected {hi - lo}: "
                           "did the corpus change since the job was planned?")
    if ctx_file is not None:
        ctx_file.close()
        os.replace(ctx_file.path, contexts_path(folder, task))
    summary = {"index": task.index, "shard": task.shard, "contexts": list(task.contexts), "latents": list(task.latents),
               "n_tokens": state.n_tokens, "positions": tokens, "seconds": seconds, "setup_seconds": tick - started,
               "tokens_per_second": tokens / max(seconds, 1e-9), "host": os.uname().nodename, "pid": os.getpid(),
               "device": str(lm.device), "dtype": str(run_sae.dtype).removeprefix("torch."),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if lm.device.type == "cuda" else None}
    save_state(state_path(folder, task), state, summary)
    return summary


def save_state(path: Path, state, summary: dict) -> None:
    """One task's state (tensors on the CPU), written under a temporary name and renamed."""
    sample = state.sample
    sample.gen = None  # the merge draws its own numbers (a generator's state is not a task's result)
    payload = {
        "summary": summary,
        "n_contexts": state.n_contexts,
        "n_tokens": state.n_tokens,
        "stats": state.stats,
        "examples": {k: v.cpu() for k, v in state.examples.state_dict().items()},
        "recon": state.recon,
        "recon_massive": state.recon_massive,
        "dark": state.dark,
        "sample": sample,
        "heads": None if state.heads is None else {"seconds": state.heads.seconds, "pairs": state.heads.pairs},
        "heads_note": state.heads_note,
    }
    statefile.save(path, payload)


def load_state(path: Path) -> dict:
    """A task's saved state; tensors memory-mapped, so a merge reads only the latents it works on."""
    return statefile.load(path)
