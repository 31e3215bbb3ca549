"""Starting the browser app on a run (``saescope serve``) and preparing the demo run (``saescope demo``).

The app itself lives in ``dashboard/``; this module only starts ``streamlit run`` (in place of the current
process), so the engine never imports Streamlit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..run.schema import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
RUN_ENV = "SAESCOPE_RUN"
DEMO_TOKENS = 200_000
"""Demo precompute budget: ~1 minute on a 2-core CPU with AMX (bf16), ~6 on an AVX2-only one (fp32, ~575 tokens/s);
the app opens at the first snapshot (16k tokens) either way."""
DEMO_CONTEXT = 128


def find_runs(path: Path) -> list[Path]:
    """Runs at ``path`` (``rundir.is_run``: finished, a snapshot, or being written): itself if it is one, else
    its sub-directories that are."""
    from ..run.rundir import is_run

    if is_run(path):
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and is_run(p))


def streamlit_command(host: str, port: int) -> list[str]:
    """The ``streamlit run`` command line for the app (flags explicit, whatever the working directory)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--browser.serverAddress", host,
    ]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def serve(run: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the app on ``run`` (a run directory or a directory of runs): this process becomes the Streamlit server."""
    path = Path(run).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory: pass a run directory (or a directory of runs)")
    if not find_runs(path):
        print(f"saescope serve: warning: {path} holds no run (no {MANIFEST}); the app will say so", file=sys.stderr)
    elif not (path / MANIFEST).is_file() and path == find_runs(path)[0]:
        print(f"saescope serve: a precompute is writing {path}; the app opens its first snapshot when it lands",
              file=sys.stderr)
    if not port_is_free(host, port):
        raise ValueError(f"port {port} on {host} is already in use: pass another with --port")
    env = {**os.environ, RUN_ENV: str(path), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    shown_host = f"[{host}]" if ":" in host else host
    print(f"saescope: serving {path} at http://{shown_host}:{port}  (Ctrl-C to stop)", flush=True)
    sys.stderr.flush()
    # cwd = the repository root so Streamlit also reads .streamlit/config.toml (theme). The server replaces this
    # process: signals (Ctrl-C, SIGTERM) reach it directly, no orphan is left, and memory used to prepare a run
    # (e.g. the demo precompute) is returned.
    os.chdir(ROOT)
    return _exec(streamlit_command(host, port), env)


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def demo_run_dir() -> Path:
    from .demo import data_dir

    return data_dir() / "runs" / "demo"


def demo_corpus() -> Path:
    from .demo import data_dir

    return data_dir() / "corpus" / "heldout.jsonl.xz"


def _demo_inputs():
    """(run dir, SAE dir, corpus, loaded SAE) of the demo, after checking the committed assets are there."""
    from ..saes import load_sae
    from .demo import demo_sae_dir

    run, sae_dir, corpus = demo_run_dir(), demo_sae_dir(), demo_corpus()
    if not (sae_dir / "cfg.json").is_file():
        raise FileNotFoundError(f"the demo SAE is missing: expected an SAELens directory at {sae_dir} (it is committed)")
    if not corpus.is_file():
        raise FileNotFoundError(f"the demo corpus is missing: expected {corpus} (it is committed)")
    return run, sae_dir, corpus, load_sae(sae_dir)


def ensure_demo_run(*, tokens: int | None = None, force: bool = False, device: str = "auto", dtype: str = "auto") -> Path:
    """The demo run directory, precomputed (here, to the end) from the committed demo SAE and held-out corpus
    when missing or stale."""
    from .demo import ensure_demo_model

    run, sae_dir, corpus, sae = _demo_inputs()
    if not force and run_state(run, sae) == "complete":
        print(f"saescope demo: using the precomputed run in {run}", file=sys.stderr, flush=True)
        return run
    from ..model.loading import load_model, resolve_device
    from ..precompute.pipeline import precompute

    model_dir = ensure_demo_model()
    lm = load_model(model_dir, device=resolve_device(device), dtype=dtype)
    budget = tokens or DEMO_TOKENS
    print(f"saescope demo: precomputing the demo run on {budget:,} held-out tokens (once)...", file=sys.stderr, flush=True)
    precompute(lm, sae.to(lm.device), corpus, run, tokens=budget, context_len=DEMO_CONTEXT, force=True, sae_path=sae_dir)
    return run


def start_demo_run(*, tokens: int | None = None, force: bool = False, device: str = "auto", dtype: str = "auto") -> Path:
    """The demo run directory as soon as it is browsable: a complete run is used as it is; otherwise a
    background precompute starts (unless one is already writing it) and this returns at its first snapshot
    (or at once, when an earlier partial snapshot of the same SAE can be shown meanwhile)."""
    from .demo import ensure_demo_model

    run, sae_dir, corpus, sae = _demo_inputs()
    state = "stale" if force else run_state(run, sae)
    if state == "complete":
        print(f"saescope demo: using the precomputed run in {run}", file=sys.stderr, flush=True)
        return run
    if state == "computing":
        print(f"saescope demo: another process is computing {run}; serving its snapshots", file=sys.stderr, flush=True)
        return run
    model_dir = ensure_demo_model()
    budget = tokens or DEMO_TOKENS
    cmd = [sys.executable, "-m", "engine.cli", "precompute", "--model", str(model_dir), "--sae", str(sae_dir),
           "--corpus", str(corpus), "--out", str(run), "--tokens", str(budget), "--context-len", str(DEMO_CONTEXT),
           "--device", device, "--dtype", dtype, "--force", "--stop-with-parent", str(os.getpid())]
    print(f"saescope demo: precomputing the demo run on {budget:,} held-out tokens in the background; the app opens "
          "at its first snapshot and refines as it goes", file=sys.stderr, flush=True)
    child = start_precompute(cmd)
    if state == "partial":  # an interrupted earlier run: browsable now, replaced by the new snapshots as they land
        return run
    return wait_for_snapshot(run, child)


def start_precompute(cmd: list[str]) -> subprocess.Popen:
    """Start a ``saescope precompute`` child (its progress bar goes to this terminal)."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def wait_for_snapshot(run: Path, child: subprocess.Popen, poll: float = 0.5) -> Path:
    """Wait until ``run`` has a manifest written by ``child`` (its first snapshot, or the finished run)."""
    from ..run.rundir import read_manifest

    started = time.time()
    while True:
        try:
            manifest = read_manifest(run)
        except ValueError:
            manifest = None
        snap = (manifest or {}).get("snapshot") or {}
        if manifest is not None and (snap.get("pid") == child.pid or child.poll() == 0):
            print(f"saescope demo: first snapshot ready after {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            return run
        code = child.poll()
        if code is not None and code != 0:
            raise RuntimeError(f"the demo precompute failed (exit code {code}); its error is printed above")
        time.sleep(poll)


def run_state(run: Path, sae) -> str:
    """``complete`` (a finished run of this SAE), ``computing`` (a snapshot whose writer still runs here),
    ``partial`` (a snapshot of this SAE whose writer stopped), or ``stale`` (none of these: compute it)."""
    from ..run.rundir import read_manifest, sae_fingerprint, writer_alive

    try:
        manifest = read_manifest(run)
    except ValueError:
        return "stale"
    if manifest is None or not Path((manifest.get("model") or {}).get("name") or "").exists():
        return "stale"  # nothing yet, or the checkout moved: the live pages could not find the model
    if (manifest.get("sae") or {}).get("hash") != sae_fingerprint(sae):
        return "stale"  # the committed SAE was retrained
    snap = manifest.get("snapshot") or {"final": True}
    if snap.get("final", True):
        return "complete"
    return "partial" if writer_alive(manifest) is False else "computing"
