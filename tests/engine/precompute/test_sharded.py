"""Sharded precompute: runs of 1, 2 and 3 token shards (and latent slices) equal the single-process run, on a real
local Ray cluster of 2 CPU workers and inline; unfinished tasks are redone alone; a killed merge leaves no run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.model.loading import load_model
from engine.model.tiny import save_tiny_model
from engine.precompute.distributed import precompute_sharded, sharded_merge
from engine.precompute.merge import merge_run
from engine.precompute.pipeline import precompute
from engine.precompute.shards import Job, split
from engine.saes import load_sae
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

OPTS: dict[str, Any] = {"context_len": 16, "batch_size": 8, "top_k": 5, "sample_contexts": 6, "ce_every": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model_dir = save_tiny_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=30)
    random_sae("topk", seed=0, d_sae=256).save(root / "sae")
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    sae = load_sae(root / "sae")
    single = precompute(lm, sae, corpus, root / "single", progress=False, **OPTS)
    return {"root": root, "model": str(model_dir), "sae": str(root / "sae"), "corpus": corpus, "lm": lm, "s": sae,
            "single": single}


def _features(run: Path):
    return pq.read_table(run / "features.parquet").sort_by("feature_id").to_pydict()


def _top_examples(run: Path):
    table = pq.read_table(run / "examples.parquet").to_pandas()
    top = table[table.kind == "top"].sort_values(["feature_id", "rank"])
    return top[["feature_id", "rank", "context_id", "max_pos", "max_act"]].to_numpy(), np.stack(top.acts.to_numpy())


def assert_same_run(single: Path, sharded: Path, m_single: dict, m_sharded: dict) -> None:
    """Exact statistics and top k; the dark-matter map and reconstruction to float tolerance."""
    a, b = _features(single), _features(sharded)
    # labels and top tokens read the quantile samples too, which are drawn, not exact (the seed rule)
    for name in ("fire_count", "density", "max_act", "dead", "hist_counts", "hist_edges"):
        assert a[name] == b[name], name
    assert np.allclose(a["mean_act"], b["mean_act"], rtol=1e-6)
    (rows_a, acts_a), (rows_b, acts_b) = _top_examples(single), _top_examples(sharded)
    assert np.array_equal(rows_a, rows_b) and np.array_equal(acts_a, acts_b)
    assert len(rows_a) > 100  # the comparison covers real examples
    assert "quantile" in pq.read_table(sharded / "examples.parquet").column("kind").to_pylist()  # quantile rows too
    for key in ("n_contexts", "n_tokens"):
        assert m_single["corpus"][key] == m_sharded["corpus"][key]
    for key in ("explained_variance", "explained_variance_with_massive", "explained_variance_without_massive", "mse",
                "cosine_sim", "l0", "n_dead", "dense_fraction", "n_massive_tokens"):
        assert m_sharded["metrics"][key] == pytest.approx(m_single["metrics"][key], rel=1e-9), key
    for key in ("heldout_error_r2", "heldout_norm_r2", "train_error_r2", "n_train_tokens", "n_heldout_tokens",
                "paper_heldout_error_r2_mean_dim", "paper_heldout_norm_sq_r2", "paper_n_heldout_tokens"):
        assert m_sharded["dark_matter"][key] == pytest.approx(m_single["dark_matter"][key], rel=1e-6), key
    import safetensors.torch as st

    map_a, map_b = st.load_file(single / "dark_matter.safetensors"), st.load_file(sharded / "dark_matter.safetensors")
    for name in map_a:
        assert torch.allclose(map_a[name], map_b[name], atol=1e-4, rtol=1e-4), name
    contexts_a = pq.read_table(single / "contexts.parquet").to_pydict()
    assert contexts_a == pq.read_table(sharded / "contexts.parquet").to_pydict()


def test_split_is_contiguous_and_on_batch_boundaries():
    assert split(37, 3, 8) == [(0, 8), (8, 24), (24, 37)]
    assert split(10, 1, 4) == [(0, 10)]
    assert split(100, 3) == [(0, 33), (33, 66), (66, 100)]
    ranges = split(1001, 7, 16)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1001
    assert all(lo % 16 == 0 and a[1] == lo for a, (lo, _) in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize(("shards", "latent_shards"), [(1, 1), (2, 1), (3, 1), (2, 3)])
def test_inline_sharded_runs_equal_the_single_process_run(setup, shards, latent_shards):
    out = setup["root"] / f"inline-{shards}x{latent_shards}"
    manifest = precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=shards,
                                  latent_shards=latent_shards, runner="inline", device="cpu", dtype="float32",
                                  progress=False, inputs=(setup["lm"], setup["s"]), **OPTS)
    assert manifest is not None and manifest["sharding"]["shards"] == shards
    assert len(manifest["sharding"]["tasks"]) == shards * latent_shards
    assert not (out / ".shards").exists() and not (out / ".partial").exists()
    assert_same_run(setup["root"] / "single", out, setup["single"], manifest)
    if shards == 1 and latent_shards == 1:  # the seed rule: one shard repeats the single process's draws
        assert pq.read_table(out / "examples.parquet").equals(pq.read_table(setup["root"] / "single" / "examples.parquet"))
        assert manifest["metrics"]["ce_loss_with_sae"] == setup["single"]["metrics"]["ce_loss_with_sae"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is in the test extra: pip install -e '.[test]'")
    if ray.is_initialized():  # seen once in a whole-suite run; this fixture needs its own 2-CPU cluster
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
                                       "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_sharded_runs_equal_the_single_process_run_and_resume(setup, ray_cluster):
    assert ray_cluster.cluster_resources()["CPU"] == 2
    for shards in (2, 3):
        out = setup["root"] / f"ray-{shards}"
        manifest = precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=shards, device="cpu",
                                      dtype="float32", progress=False, inputs=(setup["lm"], setup["s"]), **OPTS)
        assert manifest is not None
        pids = {t["pid"] for t in manifest["sharding"]["tasks"]}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2  # in the cluster's (two) worker processes
        assert_same_run(setup["root"] / "single", out, setup["single"], manifest)

    # the command line, on the same cluster
    from engine.cli import main

    out = setup["root"] / "ray-cli"
    assert main(["precompute", "--model", setup["model"], "--sae", setup["sae"], "--corpus", str(setup["corpus"]),
                 "--out", str(out), "--shards", "2", "--device", "cpu", "--dtype", "float32", "--context-len", "16",
                 "--batch-size", "8", "--top-k", "5", "--sample-contexts", "6"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sharding"]["shards"] == 2 and manifest["settings"]["top_k"] == 5
    assert _features(out)["fire_count"] == _features(setup["root"] / "single")["fire_count"]

    # a lost task is redone alone: the others' saved states are reused, and the run is the same
    out = setup["root"] / "ray-resume"
    kwargs: dict[str, Any] = {"device": "cpu", "dtype": "float32", "progress": False, "inputs": (setup["lm"], setup["s"]), **OPTS}
    assert precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=3, merge=False, **kwargs) is None
    states = sorted((out / ".shards").glob("task-*.safetensors"))
    assert len(states) == 3 and not (out / "manifest.json").exists()
    states[1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in (states[0], states[2])}
    assert precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=3, merge=False, **kwargs) is None
    assert states[1].is_file()  # redone
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the others were not
    manifest = sharded_merge(out, progress=False)
    assert [t["index"] for t in manifest["sharding"]["tasks"]] == [0, 1, 2]
    assert_same_run(setup["root"] / "single", out, setup["single"], manifest)


@pytest.mark.slow
def test_a_merge_spread_over_ray_tasks_by_latent_range_writes_the_same_run(setup, ray_cluster, tmp_path):
    """The examples file of a 2 x 2 job (two latent slices of two 64-latent ranges each) prepared by Ray tasks
    equals the one prepared by threads in the merging process, byte for byte in content, labels included."""
    from engine.precompute import runfiles

    kwargs: dict[str, Any] = {"device": "cpu", "dtype": "float32", "progress": False, "inputs": (setup["lm"], setup["s"]), **OPTS}
    out = tmp_path / "run"
    assert precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=2, latent_shards=2, merge=False,
                              **kwargs) is None
    mp = pytest.MonkeyPatch()
    mp.setattr(runfiles, "EXAMPLE_RANGE", 64)  # several ranges per slice, so blocks and their order matter
    try:
        threads = sharded_merge(out, keep_states=True, progress=False)
        files = {name: pq.read_table(out / name) for name in ("examples.parquet", "features.parquet")}
        spread = merge_run(out, inputs=(setup["lm"], setup["s"]), progress=False, ray=ray_cluster)
    finally:
        mp.undo()
    assert threads["sharding"]["merge_examples"] == {"runner": "threads"}
    record = spread["sharding"]["merge_examples"]
    assert record["runner"] == "ray" and record["tasks"] >= 2 and os.getpid() not in record["pids"]
    assert len(record["pids"]) == record["tasks"]
    assert pq.read_table(out / "examples.parquet").equals(files["examples.parquet"])
    assert pq.read_table(out / "examples.parquet").num_rows > 100
    a, b = pq.read_table(out / "features.parquet").to_pydict(), files["features.parquet"].to_pydict()
    for name in ("label", "top_token_ids", "fire_count", "neighbor_ids"):
        assert a[name] == b[name], name
    assert_same_run(setup["root"] / "single", out, setup["single"], spread)
    assert not (out / ".shards").exists()  # the states go once the run is in place


def test_merge_refuses_unfinished_tasks_and_a_killed_merge_leaves_no_run(setup, tmp_path):
    out = tmp_path / "run"
    kwargs: dict[str, Any] = {"device": "cpu", "dtype": "float32", "progress": False, "inputs": (setup["lm"], setup["s"]), **OPTS}
    precompute_sharded(setup["model"], setup["sae"], setup["corpus"], out, shards=2, runner="inline", merge=False, **kwargs)
    job = Job.load(out / ".shards")
    assert job.shards == 2 and len(job.tasks()) == 2
    moved = out / ".shards" / "task-0001.safetensors"
    moved.rename(tmp_path / "aside.safetensors")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "engine.cli", "merge", str(out)]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "1 of 2 tasks" in done.stderr and "task" in done.stderr
    (tmp_path / "aside.safetensors").rename(moved)

    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (out / ".partial").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the merge ended before it could be killed"
    assert not (out / "manifest.json").exists()  # nothing that looks like a run
    assert len(list((out / ".shards").glob("task-*.safetensors"))) == 2  # the task states survive

    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n_tokens"] == setup["single"]["corpus"]["n_tokens"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert_same_run(setup["root"] / "single", out, setup["single"], manifest)
    assert not (out / ".shards").exists()
