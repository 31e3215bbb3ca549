"""One writer per output (engine/lock.py): a second writer is refused with a message naming the first, a dead
writer's lock is recovered, nested holds in one process count, readers share; and the commands hold it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import lock
from engine.precompute.pipeline import precompute
from engine.tools.export import check_out

ROOT = Path(__file__).resolve().parents[2]
HOLDER = textwrap.dedent("""
    import sys
    from engine import lock
    with lock.hold(sys.argv[1], "saescope precompute --out test", shared=sys.argv[2] == "shared"):
        print("held", flush=True)
        sys.stdin.readline()
""")


@pytest.fixture
def holder():
    """``start(folder, shared)``: a real second process holding the lock until the test ends."""
    procs = []

    def start(folder: Path, shared: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "shared" if shared else "exclusive"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"  # waits for the lock to be taken
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_a_second_writer_is_refused_with_the_first_named(tmp_path, holder):
    proc = holder(tmp_path / "run")
    with pytest.raises(lock.Locked) as err, lock.hold(tmp_path / "run", "second"):
        pass
    message = str(err.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "saescope precompute --out test" in message
    assert "saescope unlock" in message
    assert lock.holder(tmp_path / "run")["pid"] == proc.pid
    with pytest.raises(lock.Locked):  # a reader's shared hold waits for no writer either: refused too
        with lock.hold(tmp_path / "run", shared=True):
            pass


def test_a_dead_writers_lock_is_recovered(tmp_path, holder):
    proc = holder(tmp_path / "run")
    proc.kill()
    proc.wait(10)
    assert lock.holder(tmp_path / "run") is None  # the kernel released the flock with the process
    with lock.hold(tmp_path / "run", "next") as held:
        assert held.recovered is not None and held.recovered["pid"] == proc.pid
        assert lock.read_owner(tmp_path / "run")["pid"] == os.getpid()


def test_readers_share_and_keep_writers_out(tmp_path, holder):
    (tmp_path / "run").mkdir()
    holder(tmp_path / "run", shared=True)
    with lock.hold(tmp_path / "run", shared=True):  # a second reader is fine
        pass
    with pytest.raises(lock.Locked), lock.hold(tmp_path / "run", "writer"):
        pass


def test_nested_holds_in_one_process_count(tmp_path):
    with lock.hold(tmp_path / "run", "outer"):
        with lock.hold(tmp_path / "run", "inner"), lock.hold(tmp_path / "run", shared=True):
            pass
        assert lock.read_owner(tmp_path / "run")["command"] == "outer"
    assert lock.holder(tmp_path / "run") is None


def test_a_shared_hold_of_nothing_creates_nothing(tmp_path):
    with lock.hold(tmp_path / "missing", shared=True):
        pass
    assert not (tmp_path / "missing").exists()


def test_unlock_refuses_a_live_writer_and_removes_a_dead_hosts_lock(tmp_path, holder):
    proc = holder(tmp_path / "run")
    with pytest.raises(lock.Locked):
        lock.unlock(tmp_path / "run")
    proc.kill()
    proc.wait(10)
    record = tmp_path / "run" / lock.LOCK_FILE
    record.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": 0, "command": "saescope merge"}))
    assert lock.unlock(tmp_path / "run")["host"] == "gpu-node-7" and not record.exists()


def test_precompute_refuses_a_run_being_written(tiny_llama, tmp_path, holder):
    from tests.engine.runs_util import write_corpus
    from tests.engine.saes_util import random_sae

    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=4)
    holder(tmp_path / "run")
    sae = random_sae("topk", d_in=64, hook="blocks.1.hook_resid_post")
    with pytest.raises(lock.Locked, match="is being written by `saescope precompute --out test`"):
        precompute(tiny_llama, sae, corpus, tmp_path / "run", context_len=16, tokens=64, progress=False)
    assert not (tmp_path / "run" / ".partial").exists()  # refused before anything was touched


def test_export_never_replaces_the_run_or_what_is_not_an_export(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for out in (run, tmp_path, run / "export"):
        with pytest.raises(ValueError, match="replace or sit inside the run"):
            check_out(run, out, force=True)
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileExistsError, match="not an earlier saescope export"):
        check_out(run, tmp_path / "notes", force=True)
    (tmp_path / "paper.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not a jsonl export"):
        check_out(run, tmp_path / "paper.tex", force=True)
    check_out(run, tmp_path / "new", force=False)  # a fresh path is fine


def test_train_force_replaces_only_an_sae(tmp_path):
    from engine.train import prepare_output

    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not an SAE .*chapter1.tex"):
        prepare_output(tmp_path / "thesis", force=True)
