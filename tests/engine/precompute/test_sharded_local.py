"""precompute --shards without --ray starts its own local Ray instance: it never joins a cluster that happens to run
on the machine (``ray start --head``, which ``ray.init()`` would find) or that ``RAY_ADDRESS`` names, and it stops
what it started. The cluster lives in a private Ray temp dir and is ended by the ids of its own processes."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from engine.model.tiny import save_tiny_model
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.fixture
def cluster():
    if not RAY.exists():
        pytest.fail(f"the ray command is missing beside {sys.executable}: pip install -e '.[test]'")
    temp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # short: Ray's socket paths must fit in 107 characters
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": str(temp), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in head.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    try:
        while not any("block forever" in line for line in seen):  # `ray start --block` says so once the head is up
            line = lines.get(timeout=120)
            assert line is not None, "ray start --head failed:\n" + "".join(seen)[-3000:]
            seen.append(line)
        address = (temp / "ray" / "ray_current_cluster").read_text().strip()  # what ray.init() would join
        assert address.endswith(f":{port}")
        (session,) = (temp / "ray").glob("session_2*")
        yield address, session, env
    finally:
        for pid in [*_descendants(head.pid), head.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_local_sharded_precompute_never_joins_a_running_cluster(cluster, tmp_path):
    address, head_session, env = cluster
    model = save_tiny_model(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=20)
    random_sae("topk", seed=0).save(tmp_path / "sae")
    args = [sys.executable, "-m", "engine.cli", "precompute", "--model", str(model), "--sae", str(tmp_path / "sae"),
            "--corpus", str(corpus), "--context-len", "16", "--batch-size", "8", "--device", "cpu", "--dtype", "float32",
            "--shards", "2"]
    # found by ray.init() on this node (the `ray start` address file), then named by RAY_ADDRESS (with the token
    # auth a join would need, so only saescope's choice keeps it out)
    for name, extra in (("found", {}), ("env", {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})):
        before = set(head_session.parent.glob("session_2*"))
        proc = subprocess.Popen([*args, "--out", str(tmp_path / name)], env={**env, **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert (tmp_path / name / "manifest.json").is_file()
        drivers = [p.name for p in (head_session / "logs").glob(f"*driver*_{proc.pid}.*")]
        assert not drivers, f"the {name} run joined the running cluster at {address}: {drivers}"
        started = set(head_session.parent.glob("session_2*")) - before
        assert len(started) == 1, f"the {name} run started no Ray instance of its own ({sorted(before)})"
        assert _processes_naming(str(started.pop())) == [], "the run's local Ray instance outlived it"
    assert (head_session.parent / "ray_current_cluster").read_text().strip() == address  # the cluster still there
