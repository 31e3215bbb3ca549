"""Live runs: snapshots published while precompute runs are complete, exact for their tokens, and atomic."""

import itertools
import json
import os
import shutil
import socket
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.precompute import runwriter
from engine.precompute.pipeline import precompute
from engine.run import rundir
from engine.run.store import RunStore
from tests.engine.runs_util import brute_force, top_contexts, write_corpus
from tests.engine.saes_util import random_sae

CTX, BATCH = 16, 4
EVERY = CTX * BATCH * 2  # a snapshot after two batches, then at doubling token counts


@pytest.fixture(scope="module")
def live_run(tiny_llama, tmp_path_factory, request):
    """A run with snapshots; each published snapshot folder and manifest is copied aside as it appears."""
    root = tmp_path_factory.mktemp("live")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=40)
    sae = random_sae("topk", hook="blocks.0.hook_resid_post")
    copies, real = [], rundir.publish_snapshot

    def publish(out, folder, manifest):
        real(out, folder, manifest)
        copy = root / f"snap{len(copies)}"
        shutil.copytree(folder, copy)
        published = json.loads((out / "manifest.json").read_text())
        assert (out / published.pop("data_dir")).resolve() == folder.resolve()
        (copy / "manifest.json").write_text(json.dumps(published))  # the copy holds its files at its top level
        copies.append(copy)

    mp = pytest.MonkeyPatch()
    mp.setattr(rundir, "publish_snapshot", publish)
    mp.setattr(runwriter, "SNAPSHOT_COST_FACTOR", 0.0)  # never skip one for time: the test wants them all
    mp.setattr(runwriter, "SNAPSHOT_MIN_REMAINING", 0.0)
    try:
        out = root / "run"
        manifest = precompute(tiny_llama, sae, corpus, out, context_len=CTX, batch_size=BATCH, snapshot_tokens=EVERY,
                              sample_contexts=4, ce_every=1, progress=False)
    finally:
        mp.undo()
    return {"root": root, "corpus": corpus, "sae": sae, "out": out, "manifest": manifest, "snapshots": copies}


def test_snapshots_are_published_at_doubling_counts_and_removed_at_the_end(live_run):
    snaps = [json.loads((p / "manifest.json").read_text()) for p in live_run["snapshots"]]
    seen = [s["snapshot"]["seen_tokens"] for s in snaps]
    assert len(seen) >= 2 and seen[0] >= EVERY and all(b >= 2 * a for a, b in itertools.pairwise(seen))
    assert all(not s["snapshot"]["final"] and s["snapshot"]["pid"] == os.getpid() for s in snaps)
    assert [s["snapshot"]["index"] for s in snaps] == list(range(1, len(snaps) + 1))
    out, final = live_run["out"], live_run["manifest"]
    assert final["snapshot"]["final"] and "data_dir" not in json.loads((out / "manifest.json").read_text())
    assert final["timings"]["snapshots"] == len(snaps) and not (out / rundir.SNAPSHOTS).exists()
    assert final["corpus"]["n_contexts"] * CTX > seen[-1]
    with RunStore.open(live_run["snapshots"][0]) as store:  # a copied snapshot: its files at the top, its manifest
        assert not store.is_final() and store.snapshot().seen_tokens == seen[0]
    with RunStore.open(out) as store:
        assert store.is_final() and store.snapshot().n_tokens == final["corpus"]["n_tokens"]


def test_every_snapshot_is_exact_for_its_tokens(live_run, tiny_llama):
    sae = live_run["sae"]
    for folder in live_run["snapshots"]:
        man = json.loads((folder / "manifest.json").read_text())
        ref = brute_force(tiny_llama, sae, folder, BATCH)
        assert len(ref["ids"]) == man["corpus"]["n_contexts"] and ref["n_tokens"] == man["corpus"]["n_tokens"]
        features = pq.read_table(folder / "features.parquet").to_pandas()
        np.testing.assert_array_equal(features["fire_count"], ref["fire_count"])
        np.testing.assert_allclose(features["max_act"], ref["max_act"], rtol=1e-5)
        assert man["metrics"]["explained_variance"] == pytest.approx(ref["explained_variance"], abs=1e-5)
        examples = pq.read_table(folder / "examples.parquet").to_pandas()
        top = examples[examples["kind"] == "top"]
        for latent in (3, 17, 100):
            got = top[top["feature_id"] == latent].sort_values("rank")["context_id"].tolist()
            assert got == top_contexts(ref["context_max"], latent, 20)


def test_a_snapshot_equals_a_run_stopped_at_its_tokens(live_run, tiny_llama, tmp_path):
    """Reading the state for a snapshot changes nothing: a fresh run of the same tokens writes the same files."""
    folder = live_run["snapshots"][-1]
    man = json.loads((folder / "manifest.json").read_text())
    fresh = precompute(tiny_llama, live_run["sae"], live_run["corpus"], tmp_path / "fresh", context_len=CTX,
                       batch_size=BATCH, tokens=man["corpus"]["n_contexts"] * CTX, snapshot_tokens=0,
                       sample_contexts=4, ce_every=1, progress=False)
    assert fresh["timings"]["snapshots"] == 0
    for name in ("features.parquet", "examples.parquet", "contexts.parquet", "tokens.parquet"):
        a, b = pq.read_table(folder / name).to_pandas(), pq.read_table(tmp_path / "fresh" / name).to_pandas()
        assert a.to_json() == b.to_json(), name
    for key in ("l0", "explained_variance", "ce_loss_clean", "ce_loss_with_sae", "kl_div", "n_tokens"):
        assert man["metrics"][key] == pytest.approx(fresh["metrics"][key], rel=1e-6), key


def test_readers_never_see_a_half_written_run(tiny_llama, tmp_path, monkeypatch):
    """A reader opening the run again and again while snapshots are published always gets a consistent one."""
    monkeypatch.setattr(runwriter, "SNAPSHOT_COST_FACTOR", 0.0)
    monkeypatch.setattr(runwriter, "SNAPSHOT_MIN_REMAINING", 0.0)
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=60)
    out, done, seen, problems = tmp_path / "run", threading.Event(), set(), []

    def reader():
        while not done.is_set():
            try:
                store = RunStore.open(out)
            except (ValueError, FileNotFoundError):  # no run directory or manifest yet
                if seen:
                    problems.append("the run disappeared after it was first seen")
                continue
            except Exception as err:
                problems.append(repr(err))
                continue
            with store:
                n = store.manifest()["corpus"]["n_contexts"]
                seen.add(n)
                if store.context(n - 1) is None or store.context(n) is not None:
                    problems.append(f"manifest says {n} contexts; the index disagrees")
                if store.n_features() != 256 or not store.examples(int(store.top_features(limit=1)[0].feature_id)):
                    problems.append("incomplete feature tables")
                store.linear_map()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        precompute(tiny_llama, random_sae("topk", hook="blocks.0.hook_resid_post"), corpus, out, context_len=CTX,
                   batch_size=BATCH, snapshot_tokens=CTX * BATCH, progress=False)
    finally:
        done.set()
        thread.join()
    assert not problems, problems[:3]
    assert len(seen) >= 2  # it saw at least one snapshot and the final run


def test_no_snapshot_when_the_run_ends_within_a_minute(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    m = precompute(tiny_llama, random_sae("topk", hook="blocks.0.hook_resid_post"), corpus, tmp_path / "run",
                   context_len=CTX, batch_size=BATCH, tokens=CTX * BATCH * 64, snapshot_tokens=CTX * BATCH, progress=False)
    assert m["timings"]["snapshots"] == 0  # a tiny model finishes in seconds: nothing to browse in between


def test_writer_alive():
    snap = {"final": False, "host": socket.gethostname(), "pid": os.getpid()}
    assert rundir.writer_alive({"snapshot": snap}) is True
    assert rundir.writer_alive({"snapshot": {**snap, "pid": 2**22 + 12345}}) is False
    assert rundir.writer_alive({"snapshot": {**snap, "host": "gpu-node-7"}}) is None
    assert rundir.writer_alive({"snapshot": {**snap, "final": True}}) is False
    assert rundir.writer_alive({}) is False  # runs written before snapshots existed are complete


def test_hostile_data_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a folder inside the run"):
        rundir.data_dir(tmp_path, {"data_dir": "../../etc"})
    with pytest.raises(ValueError, match="not a folder inside the run"):
        rundir.data_dir(tmp_path, {"data_dir": "/etc"})


def test_a_wide_runs_first_snapshot_does_not_wait_for_the_weight_only_facts(tiny_llama, tmp_path, monkeypatch):
    """Above --neighbors-exact-max (here forced low) the first snapshot leaves the logit effects and neighbours
    null (``pending``); the next snapshot and the final run have them, equal to a run without snapshots."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    sae = random_sae("topk", hook="blocks.0.hook_resid_post")
    copies, real = [], rundir.publish_snapshot

    def publish(out, folder, manifest):
        real(out, folder, manifest)
        copies.append((pq.read_table(folder / "features.parquet").to_pydict(), manifest["neighbors"]))

    monkeypatch.setattr(rundir, "publish_snapshot", publish)
    monkeypatch.setattr(runwriter, "SNAPSHOT_COST_FACTOR", 0.0)
    monkeypatch.setattr(runwriter, "SNAPSHOT_MIN_REMAINING", 0.0)
    opts = {"context_len": CTX, "batch_size": BATCH, "sample_contexts": 4, "ce_every": 1, "progress": False,
            "neighbors_exact_max": 16, "neighbors_probe": 4}
    final = precompute(tiny_llama, sae, corpus, tmp_path / "run", snapshot_tokens=EVERY, **opts)
    assert len(copies) >= 2
    first, info = copies[0]
    assert info == {"method": "pending", "n": 10}
    for name in ("neighbor_ids", "neighbor_cos", "top_logit_ids", "bottom_logit_values"):
        assert all(v is None for v in first[name]), name
    assert sum(c > 0 for c in first["fire_count"]) > 0  # the statistics are there
    later, later_info = copies[1]
    assert later_info["method"] == "ivf" and final["neighbors"] == later_info
    plain = precompute(tiny_llama, sae, corpus, tmp_path / "plain", snapshot_tokens=0, **opts)
    assert plain["neighbors"] == final["neighbors"]
    got = pq.read_table(tmp_path / "run" / "features.parquet").to_pydict()
    want = pq.read_table(tmp_path / "plain" / "features.parquet").to_pydict()
    for name in ("neighbor_ids", "neighbor_cos", "top_logit_ids", "top_logit_values"):
        assert got[name] == want[name] == later[name], name
    # wider than --neighbors-on-demand-above there is no search to wait for: the first snapshot already says the
    # page finds the neighbours (not "pending", which would keep the page from computing them)
    copies.clear()
    precompute(tiny_llama, sae, corpus, tmp_path / "ondemand", snapshot_tokens=EVERY, **opts,
               neighbors_on_demand_above=32)
    assert copies and copies[0][1] == {"method": "on_demand", "n": 10}
    assert all(v is not None for v in copies[0][0]["top_logit_ids"])
