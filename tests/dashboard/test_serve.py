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


def test_serve_passes_the_explainer_to_the_app(tiny_runs, launches, capsys, monkeypatch):
    # set (empty: no explainer) so that what the command writes into this process's environment is undone after
    monkeypatch.setenv("SAESCOPE_EXPLAINER", "")
    monkeypatch.setenv("SAESCOPE_EXPLAINER_MODEL", "")
    port = str(_free_port())
    assert cli.main(["serve", "--run", str(tiny_runs["topk"]), "--port", port, "--explainer-model", "m"]) == 2
    assert "pass --explainer too" in capsys.readouterr().err and not launches
    args = ["--explainer", "http://127.0.0.1:9/v1", "--explainer-model", "m"]
    assert cli.main(["serve", "--run", str(tiny_runs["topk"]), "--port", port, *args]) == 0
    ((_, _, env),) = launches
    assert env["SAESCOPE_EXPLAINER"] == "http://127.0.0.1:9/v1" and env["SAESCOPE_EXPLAINER_MODEL"] == "m"


def test_serve_beyond_loopback_warns_and_requires_a_token(tiny_runs, launches, capsys, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    monkeypatch.delenv(serve.READ_ONLY_ENV, raising=False)
    run, port = str(tiny_runs["topk"]), str(_free_port())
    assert cli.main(["serve", "--run", run, "--port", port]) == 0  # loopback: open, as before
    assert launches[-1][2][serve.TOKEN_ENV] == "" and launches[-1][2][serve.READ_ONLY_ENV] == ""
    assert "warning" not in capsys.readouterr().err

    assert cli.main(["serve", "--run", run, "--port", port, "--host", "0.0.0.0"]) == 0  # no token given: one is made
    ((cmd, _, env),) = launches[1:]
    token = env[serve.TOKEN_ENV]
    assert len(token) >= serve.MIN_TOKEN and dict(zip(cmd[5::2], cmd[6::2], strict=True))["--server.address"] == "0.0.0.0"
    out, err = capsys.readouterr()
    assert "warning: 0.0.0.0 is not a loopback address" in err and "access token (generated" in err and token in err
    assert f"?token={token}" in out and "--read-only" in err
    assert cli.main(["serve", "--run", run, "--port", port, "--host", "0.0.0.0"]) == 0
    assert launches[-1][2][serve.TOKEN_ENV] not in ("", token)  # a fresh one each start

    assert cli.main(["serve", "--run", run, "--port", port, "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "16 or more" in capsys.readouterr().err and len(launches) == 3
    monkeypatch.setenv(serve.TOKEN_ENV, "chosen-in-the-environment")
    assert cli.main(["serve", "--run", run, "--port", port, "--host", "0.0.0.0", "--read-only"]) == 0
    env = launches[-1][2]
    assert env[serve.TOKEN_ENV] == "chosen-in-the-environment" and env[serve.READ_ONLY_ENV] == "1"
    out, err = capsys.readouterr()
    assert "generated" not in err and "read-only" in out


def test_loopback_addresses():
    assert all(serve.is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"))
    assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org", "10.0.0.1"))


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


def _tiny_demo(data, folders=("demo_sae", "demo_sae_attn"), n_docs=100):
    """The demo's assets in ``data``, tiny: a random model (with its checksums, as the converted one has), a
    held-out corpus, and one random SAE per folder (all on the tiny model's hook)."""
    import lzma

    from engine.model.tiny import save_tiny_model
    from engine.tools.demo import CHECKSUMS, demo_model_dir, sha256
    from tests.dashboard.tinyrun import write_corpus

    model = save_tiny_model(demo_model_dir())
    (model / CHECKSUMS).write_text(json.dumps({p.name: sha256(p) for p in model.iterdir() if p.is_file()}))
    text = write_corpus(data / "corpus.jsonl", n_docs=n_docs).read_bytes()
    (data / "corpus" / "heldout.jsonl.xz").write_bytes(lzma.compress(text))
    return [make_sae("topk", seed=i).save(data / folder) for i, folder in enumerate(folders)]


def test_demo_registry_offers_the_saes_on_disk(demo_data):
    from engine.tools.demo import DEMO_SAES, demo_saes

    assert DEMO_SAES[0].run == "demo" and DEMO_SAES[0].folder == "demo_sae"  # existing data/runs/demo stays valid
    assert len({s.run for s in DEMO_SAES}) == len(DEMO_SAES) == len({s.folder for s in DEMO_SAES})
    with pytest.raises(FileNotFoundError, match="demo SAE is missing"):
        demo_saes()  # the main one is required
    make_sae("topk").save(demo_data / "demo_sae")
    make_sae("topk").save(demo_data / "demo_sae_w9216")
    (demo_data / "demo_sae_attn").mkdir()  # being written: no cfg.json yet
    assert [s.run for s in demo_saes()] == ["demo", "demo-w9216"]  # registry order; missing folders skipped
    assert [s.run for s in demo_saes(["demo-w9216"])] == ["demo-w9216"]
    assert demo_saes()[1].run_dir == demo_data / "runs" / "demo-w9216" == serve.demo_runs_dir() / "demo-w9216"
    with pytest.raises(FileNotFoundError, match="'demo-attn-l20' is missing.*demo_sae_attn"):
        demo_saes(["demo", "demo-attn-l20"])  # asked for by name: an error, not a silent skip


def test_demo_serves_the_committed_family_table_only_for_the_weights_it_measured(demo_data, capsys):
    from engine.model.loading import load_model
    from engine.tools.demo import demo_model_dir
    from engine.train.family_table import INFO_FILE, TABLE_FILE, FamilyTableConfig, family_table, read_family_table

    assert serve.install_family_table() is None  # nothing committed: nothing served
    _tiny_demo(demo_data, ("demo_sae", "demo_sae_fc"))
    lm = load_model(demo_model_dir(), dtype="float32")
    cfg = FamilyTableConfig(eval_corpus=str(demo_data / "corpus" / "heldout.jsonl.xz"), eval_contexts=2, ce_contexts=1,
                            context_len=32, steer_latents=1, steer_contexts=1, steer_len=16, steer_prompt=4)
    committed = demo_data / serve.FAMILY_TABLE
    family_table(lm, [demo_data / "demo_sae", demo_data / "demo_sae_fc"], cfg, committed)
    served = serve.install_family_table()
    assert served == demo_data / "runs" / "families"
    for name in (TABLE_FILE, INFO_FILE):
        assert (served / name).read_bytes() == (committed / name).read_bytes()
    assert read_family_table(served)[0]["sae"].tolist() == ["demo_sae", "demo_sae_fc"]
    make_sae("topk", seed=9).save(demo_data / "demo_sae_fc")  # retrained: the committed row describes other weights
    assert serve.install_family_table() is None
    assert "other weights of demo_sae_fc" in capsys.readouterr().err
    assert not served.exists()  # the copy served before is withdrawn


def test_demo_unknown_sae_name_lists_the_valid_ones(demo_data, capsys):
    from engine.tools.demo import DEMO_SAES

    make_sae("topk").save(demo_data / "demo_sae")
    assert cli.main(["demo", "--no-serve", "--sae", "demo,demo-mlp"]) == 2
    err = capsys.readouterr().err
    assert "unknown demo SAE 'demo-mlp'" in err and all(s.run in err for s in DEMO_SAES)
    assert not (demo_data / "runs").exists()


def test_demo_needs_the_committed_sae(demo_data, capsys):
    with pytest.raises(FileNotFoundError, match="demo SAE is missing"):
        serve.ensure_demo_runs()
    assert cli.main(["demo", "--no-serve"]) == 2 and "demo SAE is missing" in capsys.readouterr().err


def test_demo_no_serve_prepares_every_selected_run_once(demo_data, monkeypatch, capsys):
    from engine.model import loading

    _tiny_demo(demo_data, ("demo_sae", "demo_sae_attn", "demo_sae_w1152"))
    loads = []
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    runs = demo_data / "runs"
    argv = ["demo", "--no-serve", "--dtype", "float32", "--tokens", "1024"]
    assert cli.main([*argv, "--sae", "demo-w1152,demo", "--sae", "demo-attn-l20"]) == 0
    assert len(loads) == 1  # the model is loaded once for all runs
    assert "runs ready in" in capsys.readouterr().out
    manifests = {name: _manifest(runs / name) for name in ("demo", "demo-attn-l20", "demo-w1152")}
    for name, folder in (("demo", "demo_sae"), ("demo-attn-l20", "demo_sae_attn"), ("demo-w1152", "demo_sae_w1152")):
        man = manifests[name]
        assert man["snapshot"]["final"] and man["sae"]["path"] == str(demo_data / folder)
        assert man["corpus"]["n_contexts"] * man["corpus"]["context_len"] == 1024 and man["corpus"]["context_len"] == 128
    stamps = {name: (runs / name / "manifest.json").stat().st_mtime_ns for name in manifests}

    assert cli.main(argv) == 0  # every SAE on disk (the default), all complete: nothing recomputed
    assert len(loads) == 1 and stamps == {n: (runs / n / "manifest.json").stat().st_mtime_ns for n in manifests}
    assert capsys.readouterr().err.count("using the precomputed run") == 3

    assert cli.main(["demo", "--no-serve", "--dtype", "float32", "--tokens", "2048", "--force", "--sae", "demo-w1152"]) == 0
    assert _manifest(runs / "demo-w1152")["corpus"]["n_contexts"] == 16  # --force and --tokens reach it
    assert {n: (runs / n / "manifest.json").stat().st_mtime_ns for n in ("demo", "demo-attn-l20")} == {
        n: stamps[n] for n in ("demo", "demo-attn-l20")}


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
    assert serve.ensure_demo_runs() == [run] and calls == []  # current: ready in seconds
    manifest["sae"]["hash"] = "something-else"  # the committed SAE was retrained
    (run / "manifest.json").write_text(json.dumps(manifest))
    serve.ensure_demo_runs(device="cpu")
    assert calls[0] == "fetch" and calls[1][1]["dtype"] == "auto"  # never a hard-coded CPU dtype
    _, (corpus, out), kwargs = calls[2]
    assert out == run and corpus.name == "heldout.jsonl.xz"
    assert kwargs["tokens"] == serve.DEMO_TOKENS and kwargs["context_len"] == 128 and kwargs["force"]
    assert kwargs["sae_path"] == demo_data / "demo_sae"


class _FakeChild:
    pid = 2**22 + 7

    def poll(self):
        return None


def test_demo_serve_reuses_complete_runs_and_queues_the_rest(demo_data, monkeypatch):
    model_dir = demo_data / "models" / "m"
    model_dir.mkdir(parents=True)
    saes = {folder: make_sae("topk", seed=i).save(demo_data / folder) for i, folder in enumerate(("demo_sae", "demo_sae_attn"))}
    from engine.saes import load_sae
    from engine.tools import demo

    main = demo_data / "runs" / "demo"
    main.mkdir(parents=True)
    manifest = {"model": {"name": str(model_dir)}, "sae": {"hash": sae_fingerprint(load_sae(saes["demo_sae"]))}}
    (main / "manifest.json").write_text(json.dumps(manifest))
    started = []
    monkeypatch.setattr(demo, "ensure_demo_model", lambda: model_dir)
    monkeypatch.setattr(serve, "start_precompute", lambda cmd: started.append(cmd) or _FakeChild())
    monkeypatch.setattr(serve, "wait_for_snapshot", lambda *a: pytest.fail("waited although the main run is complete"))
    assert serve.start_demo_runs(tokens=4096, force=False) == demo_data / "runs"  # at once: the main run is complete
    ((cmd),) = started
    assert cmd[1:5] == ["-m", "engine.cli", "demo", "--no-serve"]
    flags = dict(zip(cmd[5:-1:2], cmd[6::2], strict=True))
    assert flags["--sae"] == "demo-attn-l20" and flags["--tokens"] == "4096"  # the complete run is not recomputed
    assert flags["--stop-with-parent"] == str(os.getpid()) and "--force" not in cmd

    (demo_data / "runs" / "demo-attn-l20").mkdir()
    manifest["sae"]["hash"] = sae_fingerprint(load_sae(saes["demo_sae_attn"]))
    (demo_data / "runs" / "demo-attn-l20" / "manifest.json").write_text(json.dumps(manifest))
    started.clear()
    assert serve.start_demo_runs() == demo_data / "runs" and started == []  # all complete: no child at all


def test_demo_serves_the_runs_at_the_main_runs_first_snapshot(demo_data, launches, monkeypatch, capsys):
    """The real background child on a tiny model: the server starts once the main run's first snapshot lands,
    while the attention SAE's run is still queued behind it; then the child computes that one too."""
    _tiny_demo(demo_data, n_docs=700)
    monkeypatch.setenv("SAESCOPE_SNAPSHOT_MIN_SECONDS", "0")  # the child snapshots however soon it will finish
    children = []
    real_start = serve.start_precompute
    monkeypatch.setattr(serve, "start_precompute", lambda cmd: children.append(real_start(cmd)) or children[-1])
    runs, port = demo_data / "runs", _free_port()
    try:
        assert cli.main(["demo", "--tokens", "32768", "--dtype", "float32", "--port", str(port)]) == 0
        ((child,),) = (children,)
        attn = _manifest(runs / "demo-attn-l20")  # read before anything else: the child goes on meanwhile
        main = _manifest(runs / "demo")
        ((cmd, _, env),) = launches
        assert env["SAESCOPE_RUN"] == str(runs)  # the directory of runs: the app shows the picker
        assert f"http://127.0.0.1:{port}/?run=demo" in capsys.readouterr().out
        assert main["snapshot"]["pid"] == child.pid and attn is None  # the main run browsable, the other queued
        assert child.wait(timeout=300) == 0
    finally:
        if children and children[0].poll() is None:
            children[0].kill()
    for name in ("demo", "demo-attn-l20"):
        man = _manifest(runs / name)
        assert man["snapshot"]["final"] and man["corpus"]["n_contexts"] == 256
    assert _manifest(runs / "demo")["timings"]["snapshots"] >= 1


def _manifest(run):
    path = run / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


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


@pytest.mark.parametrize("child", ["precompute", "demo"])
def test_background_precompute_stops_with_the_process_that_started_it(tmp_path, monkeypatch, child):
    """The demo's background child (``saescope demo --no-serve --stop-with-parent``, and a ``saescope precompute``
    one) ends, as on Ctrl-C (nothing half-written), when the server that started it dies."""
    import subprocess
    import time

    # 6,000 documents: ~10-30 s of precompute on a fast CPU, so it is mid-run when the parent dies after 3 s
    if child == "precompute":
        out = tmp_path / "run"
        cmd = _precompute_cmd(tmp_path, out, "--snapshot-tokens", "0", "--stop-with-parent", n_docs=6000)
    else:
        monkeypatch.setenv("SAESCOPE_DATA_DIR", str(tmp_path))
        (tmp_path / "corpus").mkdir()
        _tiny_demo(tmp_path, n_docs=6000)
        out = tmp_path / "runs" / "demo"
        cmd = [sys.executable, "-m", "engine.cli", "demo", "--no-serve", "--dtype", "float32", "--tokens", "1000000",
               "--stop-with-parent"]
    parent = ("import os, subprocess, sys, time; p = subprocess.Popen([*sys.argv[1:], str(os.getpid())]); "
              "print(p.pid, flush=True); time.sleep(3)")
    env = {**os.environ, "PYTHONPATH": str(serve.ROOT)}
    # the parent ignores SIGINT, as a background job or nohup does, and its child inherits that: it must stop anyway
    import signal

    proc = subprocess.Popen([sys.executable, "-c", parent, *cmd], stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())
    proc.wait(timeout=30)  # the parent exits after 3 s; the child is mid-run
    deadline = time.time() + 120  # generous: on a loaded machine the child may still be importing torch
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child_pid, 9)
        pytest.fail(f"the {child} child outlived its parent")
    assert not (out / ".partial").exists() and not (out / "manifest.json").exists()
    assert not (tmp_path / "runs" / "demo-attn-l20").exists()  # the queued run was never started
