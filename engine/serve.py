"""Starting the browser app on a run (``saescope serve``) and preparing the demo run (``saescope demo``).

The app itself lives in ``dashboard/``; this module only starts ``streamlit run`` (in place of the current
process), so the engine never imports Streamlit.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from .schema import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
RUN_ENV = "SAESCOPE_RUN"
DEMO_TOKENS = 300_000
"""Demo precompute budget: ~2-3 minutes for the demo model on a 2-core CPU, so a fresh clone is browsable in ~10."""
DEMO_CONTEXT = 128


def find_runs(path: Path) -> list[Path]:
    """Complete runs at ``path``: itself if it has a manifest, else its sub-directories that do."""
    if (path / MANIFEST).is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


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
        print(
            f"saescope serve: warning: {path} holds no complete run (no {MANIFEST}); the app will say so",
            file=sys.stderr,
        )
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


def ensure_demo_run(*, tokens: int | None = None, force: bool = False, device: str = "auto", dtype: str = "auto") -> Path:
    """The demo run directory, precomputed from the committed demo SAE and held-out corpus when missing or stale."""
    from .demo import demo_sae_dir, ensure_demo_model
    from .saes import load_sae

    run, sae_dir, corpus = demo_run_dir(), demo_sae_dir(), demo_corpus()
    if not (sae_dir / "cfg.json").is_file():
        raise FileNotFoundError(f"the demo SAE is missing: expected an SAELens directory at {sae_dir} (it is committed)")
    if not corpus.is_file():
        raise FileNotFoundError(f"the demo corpus is missing: expected {corpus} (it is committed)")
    sae = load_sae(sae_dir)
    if not force and _run_is_current(run, sae):
        print(f"saescope demo: using the precomputed run in {run}", file=sys.stderr, flush=True)
        return run
    from .models import load_model, resolve_device
    from .precompute import precompute

    model_dir = ensure_demo_model()
    dev = resolve_device(device)
    lm = load_model(model_dir, device=dev, dtype=dtype)
    budget = tokens or DEMO_TOKENS
    print(f"saescope demo: precomputing the demo run on {budget:,} held-out tokens (once)...", file=sys.stderr, flush=True)
    precompute(lm, sae.to(lm.device), corpus, run, tokens=budget, context_len=DEMO_CONTEXT, force=True, sae_path=sae_dir)
    return run


def _run_is_current(run: Path, sae) -> bool:
    """True when ``run`` is complete and was computed from this SAE (a retrained demo SAE gets a fresh run)."""
    from .rundir import read_manifest, sae_fingerprint

    try:
        manifest = read_manifest(run)
    except ValueError:
        return False
    if manifest is None or not Path((manifest.get("model") or {}).get("name") or "").exists():
        return False  # incomplete, or the checkout moved: the live pages could not find the model
    return (manifest.get("sae") or {}).get("hash") == sae_fingerprint(sae)
