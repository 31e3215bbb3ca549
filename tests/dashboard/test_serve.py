"""``saescope serve`` and ``saescope demo``: the launch command, refusals, and when the demo run is reused."""

import importlib
import json
import os
import socket
import sys

import pytest

from engine import cli
from engine.run.rundir import sae_fingerprint
from engine.tools import serve
from tests.dashboard.tinyrun import make_sae


@pytest.fixture
def launches(monkeypatch):
    """Record what ``serve`` would exec instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(serve, "_exec", lambda cmd, env: calls.append((cmd, os.getcwd(), env)) or 0)
    monkeypatch.chdir(os.getcwd())  # serve changes directory to the repository root
    return calls


def test_serve_launches_streamlit_on_localhost_with_the_run(tiny_runs, launches, capsys):
    port = _free_port()
    assert cli.main(["serve", "--run", str(tiny_runs["topk"]), "--port", str(port)]) == 0
    ((cmd, cwd, env),) = launches
    assert cmd[0] == sys.executable and cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(serve.APP)
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == str(port)
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert env["SAESCOPE_RUN"] == str(tiny_runs["topk"]) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cwd == str(serve.ROOT) and (serve.ROOT / ".streamlit" / "config.toml").is_file()
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out


def test_serve_refusals(tmp_path, launches, capsys):
    assert cli.main(["serve", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--run", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert not launches
    assert "holds no run" in err and f"port {port}" in err and "--port" in err


def test_find_runs(tiny_runs, tmp_path):
    assert serve.find_runs(tiny_runs["topk"]) == [tiny_runs["topk"]]
    assert serve.find_runs(tiny_runs["topk"].parent) == sorted([tiny_runs["topk"], tiny_runs["mp"]])
    assert serve.find_runs(tmp_path) == []


@pytest.fixture
def demo_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_DATA_DIR", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "heldout.jsonl.xz").write_bytes(b"")
    return tmp_path


def test_demo_needs_the_committed_sae(demo_data):
    with pytest.raises(FileNotFoundError, match="demo SAE is missing"):
        serve.ensure_demo_run()


def test_demo_reuses_a_current_run_and_recomputes_a_stale_one(demo_data, monkeypatch):
    sae = make_sae("topk")
    sae.save(demo_data / "demo_sae")
    run = demo_data / "runs" / "demo"
    run.mkdir(parents=True)
    model_dir = demo_data / "models" / "m"
    model_dir.mkdir(parents=True)
    manifest = {"model": {"name": str(model_dir)}, "sae": {"hash": sae_fingerprint(sae)}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    calls = []
    modules = {name: importlib.import_module(f"engine.{path}") for name, path in
               (("demo", "tools.demo"), ("models", "model.loading"), ("precompute", "precompute.pipeline"))}
    monkeypatch.setattr(modules["demo"], "ensure_demo_model", lambda: calls.append("fetch") or model_dir)
    monkeypatch.setattr(modules["models"], "load_model", lambda *a, **k: calls.append(("load", k)) or _FakeLM())
    monkeypatch.setattr(modules["precompute"], "precompute", lambda *a, **k: calls.append(("precompute", a[2:4], k)))
    assert serve.ensure_demo_run() == run and calls == []  # current: ready in seconds
    manifest["sae"]["hash"] = "something-else"  # the committed SAE was retrained
    (run / "manifest.json").write_text(json.dumps(manifest))
    serve.ensure_demo_run(device="cpu")
    assert calls[0] == "fetch" and calls[1][1]["dtype"] == "auto"  # never a hard-coded CPU dtype
    _, (corpus, out), kwargs = calls[2]
    assert out == run and corpus.name == "heldout.jsonl.xz"
    assert kwargs["tokens"] == serve.DEMO_TOKENS and kwargs["context_len"] == 128 and kwargs["force"]
    assert kwargs["sae_path"] == demo_data / "demo_sae"


class _FakeLM:
    device = "cpu"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_state(tmp_path):
    sae = make_sae("topk")
    run, model_dir = tmp_path / "run", tmp_path / "model"
    run.mkdir()
    model_dir.mkdir()
    assert serve.run_state(run, sae) == "stale"  # nothing yet
    manifest = {"model": {"name": str(model_dir)}, "sae": {"hash": sae_fingerprint(sae)}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert serve.run_state(run, sae) == "complete"  # runs from before snapshots existed count as complete
    snap = {"final": False, "host": socket.gethostname(), "pid": os.getpid()}
    (run / "manifest.json").write_text(json.dumps({**manifest, "snapshot": snap}))
    assert serve.run_state(run, sae) == "computing"
    (run / "manifest.json").write_text(json.dumps({**manifest, "snapshot": {**snap, "pid": 2**22 + 99}}))
    assert serve.run_state(run, sae) == "partial"
    (run / "manifest.json").write_text(json.dumps({**manifest, "sae": {"hash": "retrained"}}))
    assert serve.run_state(run, sae) == "stale"


def _precompute_cmd(tmp_path, out, *extra, n_docs=600):
    from engine.model.tiny import save_tiny_model
    from tests.dashboard.tinyrun import write_corpus

    model = save_tiny_model(tmp_path / "model")
    sae = make_sae("topk").save(tmp_path / "sae")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=n_docs)
    return [sys.executable, "-m", "engine.cli", "precompute", "--model", str(model), "--sae", str(sae), "--corpus",
            str(corpus), "--out", str(out), "--context-len", "16", "--batch-size", "8", "--dtype", "float32", *extra]


def test_background_precompute_is_browsable_at_its_first_snapshot(tmp_path):
    from engine.run.store import RunStore

    out = tmp_path / "run"
    os.environ["SAESCOPE_SNAPSHOT_MIN_SECONDS"] = "0"  # the child snapshots however soon it will finish
    try:
        child = serve.start_precompute(_precompute_cmd(tmp_path, out, "--snapshot-tokens", "1024"))
    finally:
        del os.environ["SAESCOPE_SNAPSHOT_MIN_SECONDS"]
    try:
        assert serve.wait_for_snapshot(out, child, poll=0.05) == out
        with RunStore.open(out) as store:  # browsable at once: a complete snapshot or the finished run
            assert store.n_features() == 256 and store.manifest()["corpus"]["n_tokens"] > 0
        assert child.wait(timeout=300) == 0
    finally:
        if child.poll() is None:
            child.kill()
    final = json.loads((out / "manifest.json").read_text())
    assert final["snapshot"]["final"] and final["timings"]["snapshots"] >= 1


def test_background_precompute_stops_with_the_process_that_started_it(tmp_path):
    """The demo's precompute child ends (as on Ctrl-C: nothing half-written) when the server that started it dies."""
    import subprocess
    import time

    out = tmp_path / "run"
    # 6,000 documents: ~30 s of precompute on a fast CPU, so it is mid-run when the parent dies after 3 s
    cmd = _precompute_cmd(tmp_path, out, "--snapshot-tokens", "0", "--stop-with-parent", n_docs=6000)
    parent = ("import os, subprocess, sys, time; p = subprocess.Popen([*sys.argv[1:], str(os.getpid())]); "
              "print(p.pid, flush=True); time.sleep(3)")
    env = {**os.environ, "PYTHONPATH": str(serve.ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", parent, *cmd], stdout=subprocess.PIPE, text=True, env=env)
    child_pid = int(proc.stdout.readline())
    proc.wait(timeout=30)  # the parent exits after 3 s; the child is mid-run
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child_pid, 9)
        pytest.fail("the precompute child outlived its parent")
    assert not (out / ".partial").exists() and not (out / "manifest.json").exists()
