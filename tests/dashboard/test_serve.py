"""``saescope serve`` and ``saescope demo``: the launch command, refusals, and when the demo run is reused."""

import importlib
import json
import socket
import subprocess

import pytest

from engine import cli, serve
from engine.rundir import sae_fingerprint
from tests.dashboard.tinyrun import make_sae


class FakePopen:
    calls: list = []

    def __init__(self, cmd, cwd=None, env=None):
        FakePopen.calls.append((cmd, cwd, env))

    def wait(self, timeout=None):
        return 0


def test_serve_launches_streamlit_on_localhost_with_the_run(tiny_runs, monkeypatch, capsys):
    FakePopen.calls = []
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    port = _free_port()
    assert cli.main(["serve", "--run", str(tiny_runs["topk"]), "--port", str(port)]) == 0
    ((cmd, cwd, env),) = FakePopen.calls
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(serve.APP)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == str(port)
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert env["SAESCOPE_RUN"] == str(tiny_runs["topk"]) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cwd == serve.ROOT and (serve.ROOT / ".streamlit" / "config.toml").is_file()
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out


def test_serve_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert cli.main(["serve", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--run", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "holds no complete run" in err and f"port {port}" in err and "--port" in err


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
    modules = {name: importlib.import_module(f"engine.{name}") for name in ("demo", "models", "precompute")}
    monkeypatch.setattr(modules["demo"], "ensure_demo_model", lambda: calls.append("fetch") or model_dir)
    monkeypatch.setattr(modules["models"], "load_model", lambda *a, **k: calls.append(("load", k)) or _FakeLM())
    monkeypatch.setattr(modules["precompute"], "precompute", lambda *a, **k: calls.append(("precompute", a[2:4], k)))
    assert serve.ensure_demo_run() == run and calls == []  # current: ready in seconds
    manifest["sae"]["hash"] = "something-else"  # the committed SAE was retrained
    (run / "manifest.json").write_text(json.dumps(manifest))
    serve.ensure_demo_run(device="cpu")
    assert calls[0] == "fetch" and calls[1][1]["dtype"] == "bfloat16"
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
