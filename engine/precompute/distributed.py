"""``saescope precompute --shards N [--latent-shards M] [--ray ADDRESS]``: a sharded precompute on Ray.

The driver loads the model and SAE once (their fingerprints name the run; the merge needs them), plans the job
(``shards.Job``) into the run's staging area and runs each unfinished task as a Ray task: one GPU per task where
the cluster has GPUs, one CPU otherwise. Without an address a new local Ray instance is started (and stopped
after), even where a cluster runs on this machine or ``RAY_ADDRESS`` names one: a job never joins a cluster by
accident (``ray.init()`` with no address would join either). With an address (``auto``: the one ``RAY_ADDRESS`` or
``ray start`` on this node names) the job joins that cluster, whose nodes must see the run directory, the model,
the SAE and the corpus at the same paths (a shared filesystem). Ray retries a task whose worker died; a task that
fails for good stops the job, and running the same command again redoes only the tasks without a saved state. Then
``merge_run`` writes the run (``--no-merge``: later, with ``saescope merge``).

``runner="inline"`` runs the tasks one after another in this process (no Ray): the same plan, states and merge.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import lock
from ..data.corpus import iter_contexts
from ..run import rundir
from .merge import merge_run
from .pipeline import PrecomputeConfig, check_inputs
from .shards import Job, done, load_inputs, load_model_and_sae, prepare_job, run_task

LOCAL = "local"
"""Ray's address for a new local instance: never one found on this machine or in ``RAY_ADDRESS``."""
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}


def plan(model: str, sae_path: str, corpus: str | Path, out: str | Path, *, shards: int, latent_shards: int = 1,
         device: str = "auto", dtype: str = "auto", force: bool = False, inputs=None, **options) -> tuple[Job, tuple]:
    """Check the inputs and ``out``, count the contexts and save the job; returns it and the loaded ``(lm, sae)``."""
    if shards < 1 or latent_shards < 1:
        raise ValueError(f"--shards and --latent-shards must be >= 1, got {shards} and {latent_shards}")
    cfg = PrecomputeConfig(**options)
    lm, sae = inputs if inputs is not None else load_model_and_sae(model, sae_path, device, dtype)
    if latent_shards > sae.cfg.d_sae:
        raise ValueError(f"--latent-shards {latent_shards} exceeds the SAE's {sae.cfg.d_sae} latents")
    check_inputs(lm, sae, corpus, cfg.context_len)
    identity = {"model_hash": rundir.model_fingerprint(lm), "sae_hash": rundir.sae_fingerprint(sae)}
    shutil.rmtree(rundir.prepare(out, **identity, force=force))  # only its checks: tasks stage in .shards
    contexts = iter_contexts(lm.tokenizer, corpus, cfg.context_len)
    limit = cfg.tokens // cfg.context_len if cfg.tokens else None
    n_contexts = sum(1 for _ in itertools.islice(contexts, limit))
    if n_contexts == 0:
        raise ValueError(f"corpus {corpus} is shorter than one context of {cfg.context_len} tokens")
    if shards > n_contexts:
        raise ValueError(f"--shards {shards} exceeds the run's {n_contexts} contexts")
    job = Job(model=str(model), device=str(device), dtype=str(dtype), sae=str(sae_path), corpus=str(corpus),
              config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, n_contexts=n_contexts, shards=shards,
              latent_shards=latent_shards, d_sae=sae.cfg.d_sae, identity=identity)
    prepare_job(out, job)
    return job, (lm, sae)


def precompute_sharded(model: str, sae_path: str, corpus: str | Path, out: str | Path, *, shards: int,
                       latent_shards: int = 1, ray_address: str | None = None, runner: str = "ray",
                       device: str = "auto", dtype: str = "auto", force: bool = False, progress: bool = True,
                       merge: bool = True, inputs=None, cpus_per_task: int = 1, **options) -> dict | None:
    """Plan, run and (with ``merge``) merge a sharded precompute; returns the manifest (None without ``merge``).
    ``options`` are ``PrecomputeConfig`` fields; ``inputs`` the loaded ``(lm, sae)`` (else loaded from the paths)."""
    with lock.hold(out, "saescope precompute --shards"):
        started = time.perf_counter()
        job, inputs = plan(model, sae_path, corpus, out, shards=shards, latent_shards=latent_shards, device=device,
                           dtype=dtype, force=force, inputs=inputs, **options)
        finished = {t.index for t in done(Path(out) / rundir.SHARDS, job)}
        todo = [t.index for t in job.tasks() if t.index not in finished]
        if progress and finished:
            print(f"precompute: {len(finished)} of {len(job.tasks())} tasks already done", file=sys.stderr, flush=True)
        if runner == "inline":
            _run_inline(out, job, todo, inputs, progress)
            return merge_run(out, inputs=inputs, progress=progress, started=started) if merge else None
        if runner != "ray":
            raise ValueError(f"unknown runner {runner!r}: use 'ray' or 'inline'")
        with ray_session(ray_address, progress) as ray:
            _run_on_ray(ray, out, job, todo, progress, cpus_per_task)
            # the merge's examples file is prepared by latent range in the same cluster's tasks
            return merge_run(out, inputs=inputs, progress=progress, started=started, ray=ray) if merge else None


class _Progress:
    """One bar for the whole job; per-task throughput in its postfix."""

    def __init__(self, job: Job, todo: list[int], progress: bool):
        tasks = job.tasks()
        per_slice = {i: (tasks[i].contexts[1] - tasks[i].contexts[0]) * job.config["context_len"] for i in todo}
        self.bar = tqdm(total=sum(per_slice.values()), unit="tok", unit_scale=True, disable=not progress,
                        desc=f"precompute {job.shards}x{job.latent_shards} tasks")
        self.seen: dict[int, tuple[int, float]] = {}

    def update(self, seen: dict[int, tuple[int, float]]) -> None:
        self.seen.update(seen)
        total = sum(tokens for tokens, _ in self.seen.values())
        self.bar.update(total - self.bar.n)
        rates = [f"t{i}:{tokens / max(sec, 1e-9) / 1e3:.1f}k" for i, (tokens, sec) in sorted(self.seen.items())]
        if rates:
            self.bar.set_postfix_str(" ".join(rates[-8:]) + " tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run_inline(out, job: Job, todo: list[int], inputs, progress: bool) -> None:
    bar = _Progress(job, todo, progress)
    try:
        for index in todo:
            run_task(out, index, report=lambda i, tokens, sec: bar.update({i: (tokens, sec)}), inputs=inputs)
    finally:
        bar.close()


@contextlib.contextmanager
def ray_session(address: str | None, progress: bool = True) -> Iterator:
    """The ``ray`` module, initialised: a new local instance without ``address`` (stopped after), the cluster at
    ``address`` otherwise; an instance this process already started is used as it is."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("--shards runs on Ray, which is not installed: pip install 'saescope[ray]'") from err

    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=address or LOCAL, include_dashboard=False, log_to_driver=progress, configure_logging=False,
                     runtime_env={"env_vars": WORKER_ENV})
        except ConnectionError as err:
            raise ConnectionError(
                f"could not join the Ray cluster at {address}: {err}. Give the head's address as `ray start --head` "
                "printed it (or --ray auto on a node of the cluster); a cluster with token authentication (Ray's "
                "default) also needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
            ) from err
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _run_on_ray(ray: Any, out, job: Job, todo: list[int], progress: bool, cpus_per_task: int) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)

    @ray.remote
    class Reporter:
        def __init__(self):
            self.seen: dict[int, tuple[int, float]] = {}

        def report(self, index: int, tokens: int, seconds: float) -> None:
            self.seen[index] = (tokens, seconds)

        def read(self) -> dict[int, tuple[int, float]]:
            return self.seen

    @ray.remote(max_retries=2, num_gpus=1 if gpus else 0, num_cpus=1 if gpus else cpus_per_task)
    def task(out: str, index: int, reporter) -> dict:
        last = [0.0]

        def report(i: int, tokens: int, seconds: float) -> None:
            if seconds - last[0] >= 0.5:
                last[0] = seconds
                reporter.report.remote(i, tokens, seconds)

        summary = run_task(out, index, report=report)
        reporter.report.remote(index, summary["positions"], summary["seconds"])
        return summary

    reporter = Reporter.remote()
    pending = [task.remote(str(out), index, reporter)  # pyright: ignore[reportAttributeAccessIssue]  (ray's decorator returns a RemoteFunction; its stub types it as the plain function)
               for index in todo]
    bar = _Progress(job, todo, progress)
    try:
        while pending:
            ready, pending = ray.wait(pending, timeout=0.5)
            seen: dict[int, tuple[int, float]] = dict(ray.get(reporter.read.remote()))  # pyright: ignore[reportFunctionMemberAccess]  (an actor method)
            for ref in ready:
                summary = ray.get(ref)  # a task that failed for good raises here (its state is not saved)
                seen[summary["index"]] = (summary["positions"], summary["seconds"])
            bar.update(seen)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on a HOST:PORT where nothing listens (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"could not join the Ray cluster at {address}: nothing answers there ({err}). Give the "
                              "head's address as `ray start --head` printed it, or --ray auto on a node of the "
                              "cluster") from err


def sharded_merge(out: str | Path, *, device: str | None = None, progress: bool = True, keep_states: bool = False,
                  ray_address: str | None = None) -> dict:
    """``saescope merge RUN``: merge a sharded precompute whose tasks are done (the model and SAE loaded from its
    job, on ``device`` when given); with ``ray_address`` (``local``: a new local instance) the examples file is
    prepared by latent range in that Ray cluster's tasks."""
    folder = Path(out) / rundir.SHARDS
    job = Job.load(folder)
    if device is not None:
        job.device = device
    start = time.perf_counter()
    inputs = load_inputs(job)
    if progress:
        print(f"merge: model and SAE loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    if ray_address is None:
        return merge_run(out, inputs=inputs, progress=progress, keep_states=keep_states)
    with ray_session(None if ray_address == LOCAL else ray_address, progress) as ray:
        return merge_run(out, inputs=inputs, progress=progress, keep_states=keep_states, ray=ray)
