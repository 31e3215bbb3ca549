"""``saescope merge``: the saved states of a sharded precompute's tasks (``shards``) merged into one run.

Token shards merge exactly (``FeatureStats.merge``, ``ExampleReservoirs.merge``, ``ReconStats.merge``,
``LinearErrorStats.merge``; the context sample as a uniform sample of the union, ``ContextSample.merge``); latent
slices are laid side by side. The example reservoirs are never merged whole: ``ShardedExamples`` merges them a
chunk of latents at a time from the memory-mapped task states while the examples file is written, so the merge
holds a few hundred latents' reservoirs however wide the SAE. The run is written as a single-process run is
(``RunWriter``: CE losses on the sampled contexts, logit effects, neighbours, the index), into the run's private
staging folder, and the manifest comes last: a merge killed at any point leaves no run that looks complete, and
the task states stay until the run is in place, so the merge can simply be run again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import atomic, lock
from ..analysis.interventions import compute_copy
from ..run import parquet, rundir, schema
from ..run.manifest import sections
from .accumulators import FeatureStats
from .pipeline import PassState, PrecomputeConfig
from .reservoirs import ExampleReservoirs, ExampleRows
from .runfiles import RangeFiles, range_files
from .runwriter import RunTarget, RunWriter
from .shards import Job, Task, contexts_path, done, load_inputs, load_state, shards_dir, state_path


class ShardedExamples:
    """The merged example reservoirs of a sharded run, as ``runfiles.write_examples`` reads them, merged lazily a
    chunk of latents at a time (``iter_rows``)."""

    def __init__(self, slices: list[tuple[range, list[dict]]], cfg: PrecomputeConfig, device: torch.device | str = "cpu"):
        self.slices, self.cfg, self.device = slices, cfg, device
        self.spread: dict | None = None
        """How the examples file's ranges were prepared when spread over Ray tasks (the manifest's record)."""
        first = slices[0][1][0]
        self.window = int(first["acts"].shape[2])  # the tasks' example windows (all equal: one config)
        d_sae = sum(len(r) for r, _ in slices)
        # only shapes are read from the payload (no memory): the rows carry the values
        self.payload = {name.removeprefix("payload."): torch.empty(d_sae, *t.shape[1:], dtype=t.dtype, device="meta")
                        for name, t in first.items() if name.startswith("payload.")}

    def _reservoirs(self, width: int) -> ExampleReservoirs:
        cfg = self.cfg
        return ExampleReservoirs(width, cfg.context_len, self.device, top_k=cfg.top_k, n_bins=cfg.quantile_bins,
                                 per_bin=cfg.per_bin, internal_bins=2 * cfg.quantile_bins, seed=cfg.seed,
                                 window=self.window)

    def merged(self, latents: range) -> ExampleReservoirs:
        """The merged reservoirs of ``latents`` (within one slice)."""
        for full, parts in self.slices:
            if full.start <= latents.start and latents.stop <= full.stop:
                local = range(latents.start - full.start, latents.stop - full.start)
                out = self._reservoirs(0).load_state(parts[0], local)
                for other in parts[1:]:
                    out.merge(self._reservoirs(0).load_state(other, local))
                return out
        raise ValueError(f"latents {latents} cross a slice boundary")

    def iter_rows(self, chunk: int = 1024):
        for latents in self.ranges(chunk):
            yield latents, self.rows_of(latents)

    def ranges(self, chunk: int = 1024) -> list[range]:
        """Consecutive latent ranges of at most ``chunk`` latents, none crossing a slice boundary."""
        return [range(lo, min(lo + chunk, full.stop)) for full, _ in self.slices for lo in range(full.start, full.stop, chunk)]

    def rows_of(self, latents: range) -> ExampleRows:
        """The merged rows of one of ``ranges`` (each call merges its own copy: safe from several threads)."""
        rows = self.merged(latents).rows()
        return dataclasses.replace(rows, feature_id=rows.feature_id + np.int32(latents.start))

    def spread_on(self, ray, out: Path) -> None:
        """Prepare the examples file's latent ranges in tasks of the Ray cluster ``ray`` (``merge_block``: blocks of
        consecutive ranges, each merged from the task states in ``out``'s job folder) instead of threads here; the
        file is the same (``runfiles.write_examples`` reads ``remote_ranges``)."""
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

        def remote_ranges(staging: Path, vocab: list[str], chunk: int) -> Iterator[RangeFiles]:
            blocks = self.blocks(chunk, 4 * cpus)
            self.spread = {"runner": "ray", "tasks": len(blocks), "pids": []}
            return _ray_ranges(ray, out, staging, blocks, vocab, 2 * cpus, self.spread["pids"])

        self.remote_ranges = remote_ranges

    def blocks(self, chunk: int, target: int) -> list[list[range]]:
        """``ranges(chunk)`` grouped into about ``target`` blocks of consecutive ranges (at most ``BLOCK_RANGES``
        each), none crossing a slice boundary."""
        ranges = self.ranges(chunk)
        per = max(1, min(BLOCK_RANGES, -(-len(ranges) // max(target, 1))))
        out: list[list[range]] = []
        for full, _ in self.slices:
            mine = [r for r in ranges if full.start <= r.start < full.stop]
            out += [mine[i : i + per] for i in range(0, len(mine), per)]
        return out

    def context_ids(self) -> np.ndarray:
        """Every context id some task's reservoirs hold (a superset of the merged reservoirs' ids)."""
        ids = [np.zeros(0, np.int64)]
        for _, parts in self.slices:
            for part in parts:
                ctx = part["ctx"]
                for lo in range(0, len(ctx), 4096):
                    block = ctx[lo : lo + 4096]
                    ids.append(torch.unique(block[block >= 0]).numpy())
        return np.unique(np.concatenate(ids))


BLOCK_RANGES = 64
"""At most this many example ranges (``runfiles.EXAMPLE_RANGE`` latents each) per Ray task of a merge."""


def merge_block(out: str, staging: str, latents: list[range], vocab: list[str]) -> tuple[int, list[RangeFiles]]:
    """A Ray task of a merge: the ``runfiles.range_files`` of consecutive latent ranges within one latent slice,
    merged from the states of that slice's tasks (memory-mapped from ``out``'s job folder, which the cluster's
    nodes see at the same path), their contexts' tokens read from the merge's ``staging`` contexts file; with the
    process id that made them."""
    folder = shards_dir(Path(out))
    job = Job.load(folder)
    lo, hi = latents[0].start, latents[-1].stop
    tasks = [t for t in job.tasks() if t.latents[0] <= lo and hi <= t.latents[1]]  # one slice, in shard order
    examples = ShardedExamples([(range(*tasks[0].latents), [load_state(state_path(folder, t))["examples"] for t in tasks])],
                               PrecomputeConfig(**job.config))
    rows = [examples.rows_of(r) for r in latents]
    wanted = np.unique(np.concatenate([np.zeros(0, np.int64), *(r.context_id for r in rows)]))
    ctx_ids, ctx_tokens = parquet.read_context_tokens(Path(staging) / schema.CONTEXTS, wanted)
    return os.getpid(), [range_files(r, lat, ctx_ids, ctx_tokens, vocab) for r, lat in zip(rows, latents, strict=True)]


def _ray_ranges(ray, out: Path, staging: Path, blocks: list[list[range]], vocab: list[str], ahead: int,
                pids: list[int]) -> Iterator[RangeFiles]:
    """``merge_block`` of each block as Ray tasks, at most ``ahead`` at once, yielded in latent order (the tasks'
    process ids appended to ``pids``); the tasks still running are cancelled if the consumer stops (a failed write)."""
    task = ray.remote(num_cpus=1, max_retries=2)(merge_block)
    vocab_ref = ray.put(vocab)
    pending: deque = deque()

    def take() -> list[RangeFiles]:
        pid, parts = ray.get(pending.popleft())
        pids.append(pid)
        return parts

    try:
        for block in blocks:
            pending.append(task.remote(str(out), str(staging), block, vocab_ref))
            if len(pending) >= ahead:
                yield from take()
        while pending:
            yield from take()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def merge_run(out: str | Path, *, inputs=None, progress: bool = True, keep_states: bool = False,
              started: float | None = None, ray=None) -> dict:
    """Merge the finished tasks of the sharded precompute in run directory ``out`` into the run; returns the
    manifest. ``inputs`` is the loaded ``(lm, sae)`` when the caller has them. The task states are removed once
    the run is in place (``keep_states`` keeps them). ``started`` (``time.perf_counter``) is when the whole job
    started, for ``timings.total_seconds`` (default: the slowest task's time before this merge). ``ray``: the
    initialised ``ray`` module, to prepare the examples file by latent range in the cluster's tasks (default:
    threads of this process)."""
    with lock.hold(out, "saescope merge"):
        merge_started = time.perf_counter()
        out = Path(out)
        folder = shards_dir(out)
        shutil.rmtree(folder.with_name(f".{folder.name}.old-removing"), ignore_errors=True)  # a removal cut short
        finished = rundir.read_manifest(out)
        if not folder.is_dir() and finished is not None and sections(finished).snapshot.final:
            return finished  # merged already (the states were removed after the run was in place)
        job = Job.load(folder)
        tasks = job.tasks()
        missing = sorted(set(t.index for t in tasks) - {t.index for t in done(folder, job)})
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(tasks)} tasks of the sharded precompute in {out} are not finished "
                               f"(tasks {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}); run the "
                               "same `saescope precompute --shards ...` again: it redoes only those, then merges")
        lm, sae = inputs if inputs is not None else load_inputs(job)
        cfg = PrecomputeConfig(**job.config)
        staging = rundir.prepare(out, **job.identity, force=True)  # the job's own run: checked when it was planned
        try:
            return _merge(out, folder, job, tasks, lm, sae, cfg, staging, progress, keep_states, merge_started, started,
                          ray)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _merge(out, folder, job: Job, tasks: list[Task], lm, sae, cfg, staging, progress, keep_states, merge_started,
           job_started, ray) -> dict:
    if progress:
        print(f"merge: {len(tasks)} task states of {out}", file=sys.stderr, flush=True)
    states = {t.index: load_state(state_path(folder, t)) for t in tasks}
    primary = [t for t in tasks if t.primary]
    first = states[primary[0].index]
    state = PassState(stats=FeatureStats(0), examples=None, recon=first["recon"], dark=first["dark"],  # type: ignore[arg-type]
                  sample=first["sample"], heads=None, heads_note=first["heads_note"], recon_massive=first["recon_massive"])
    state.n_contexts, state.n_tokens = first["n_contexts"], first["n_tokens"]
    gen = np.random.default_rng(cfg.seed)
    for task in primary[1:]:
        part = states[task.index]
        state.recon.merge(part["recon"])
        if state.recon_massive is not None:
            state.recon_massive.merge(part["recon_massive"])
        state.dark.merge(part["dark"])
        state.sample.merge(part["sample"], gen)
        state.n_contexts += part["n_contexts"]
        state.n_tokens += part["n_tokens"]
    tick = time.perf_counter()
    _join_contexts(staging / schema.CONTEXTS, [contexts_path(folder, t) for t in primary])
    contexts_seconds = time.perf_counter() - tick

    tick = time.perf_counter()
    slices = sorted({t.latents for t in tasks})
    per_slice = [[states[t.index] for t in tasks if t.latents == lat] for lat in slices]  # in shard order
    stats = []
    for parts in per_slice:
        merged = parts[0]["stats"]
        for part in parts[1:]:
            merged.merge(part["stats"])
        stats.append(merged)
    state.stats = FeatureStats.concat(stats) if len(stats) > 1 else stats[0]
    examples = ShardedExamples([(range(*lat), [p["examples"] for p in parts])
                                for lat, parts in zip(slices, per_slice, strict=True)], cfg)
    if ray is not None:
        examples.spread_on(ray, Path(out))
    state.examples = examples  # type: ignore[assignment]
    if first["heads"] is not None:
        from .heads import HeadAttribution

        state.heads, _ = HeadAttribution.setup(lm, sae, cfg.dfa_sources)
        if state.heads is not None:
            state.heads.seconds = sum(states[t.index]["heads"]["seconds"] for t in tasks)
            state.heads.pairs = sum(states[t.index]["heads"]["pairs"] for t in tasks)
    stats_seconds = time.perf_counter() - tick

    summaries = [states[t.index]["summary"] for t in tasks]
    pass_seconds = max(s["seconds"] + s["setup_seconds"] for s in summaries)
    timings = {
        "setup_seconds": max(s["setup_seconds"] for s in summaries),
        "main_pass_seconds": max(s["seconds"] for s in summaries),
        "tokens_per_second": state.n_tokens / max(max(s["seconds"] for s in summaries), 1e-9),
        "snapshots": 0,
        "merge_contexts_seconds": contexts_seconds,
        "merge_stats_seconds": stats_seconds,
    }
    writer = RunWriter(RunTarget(lm, sae, compute_copy(sae, lm), sae.cfg.hook_name, job.corpus, cfg, staging, Path(out),
                                 job.identity, job.sae, state.n_contexts * cfg.context_len,
                                 job_started if job_started is not None else merge_started - pass_seconds))
    tick = time.perf_counter()
    manifest_timings = {**timings, "merge_seconds": 0.0}
    manifest = writer.final(state, None, manifest_timings)  # examples merge while they are written
    manifest["timings"]["merge_seconds"] = round(time.perf_counter() - merge_started, 4)
    manifest["sharding"] = {"shards": job.shards, "latent_shards": job.latent_shards, "seed_rule": "shards.shard_seed",
                            "tasks": summaries, "write_seconds": round(time.perf_counter() - tick, 4),
                            "merge_examples": examples.spread or {"runner": "threads"}}
    rundir.rewrite_manifest(out, manifest)
    if not keep_states:
        remove_states(folder)
    return manifest


def remove_states(folder: Path) -> None:
    """Remove the task states once the run is in place: renamed away first, so that a crash part-way through the
    removal never leaves a job folder with some states gone (``merge_run`` finishes such a removal)."""
    gone = folder.with_name(f".{folder.name}.old-removing")
    os.replace(folder, gone)
    atomic.fsync_dir(folder.parent)
    shutil.rmtree(gone, ignore_errors=True)


def _join_contexts(dest: Path, parts: list[Path]) -> None:
    """The primary tasks' contexts files, in shard order (context ids ascending), as one file."""
    with pq.ParquetWriter(dest, schema.CONTEXTS_SCHEMA, compression="zstd") as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=4096):
                writer.write_batch(batch)
        if not parts:
            writer.write_table(schema.CONTEXTS_SCHEMA.empty_table())
