"""Starting the browser app on a run (``saescope serve``) and preparing the demo's runs (``saescope demo``: one run
per demo SAE, ``demo.DEMO_SAES``).

The app itself lives in ``dashboard/``; this module only starts ``streamlit run`` (in place of the current
process), so the engine never imports Streamlit.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from .. import settings
from ..run.manifest import sections
from ..run.schema import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
RUN_ENV = settings.RUN.name
TOKEN_ENV = settings.TOKEN.name
"""The access token the app asks every browser session for (``dashboard/access.py``); ``--token`` sets it."""
READ_ONLY_ENV = settings.READ_ONLY.name
"""``1``: the app does not write into runs (``--read-only``)."""
MIN_TOKEN = 16
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def access_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The token the app will ask for, and whether it was generated here: ``token`` (``--token``), else
    ``$SAESCOPE_TOKEN``, else none on a loopback host and a fresh random one on any other (the app must never be
    open to the network)."""
    token = token or settings.get(settings.TOKEN) or None
    if token is not None and len(token) < MIN_TOKEN:
        raise ValueError(f"the access token is {len(token)} characters long: use {MIN_TOKEN} or more (or pass none beyond "
                         "loopback, and serve generates one)")
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(24), True
    return token, False


def serve(run: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8501, first: str | None = None,
          token: str | None = None, read_only: bool = False) -> int:
    """Run the app on ``run`` (a run directory or a directory of runs): this process becomes the Streamlit server.
    ``first``: the run of a directory of runs that the printed link opens (the picker's ``run=``). ``token``: the
    access token each browser session must give (``access_token``: required, and generated when not given, for a
    host other machines can reach). ``read_only``: the app's buttons that write into runs are turned off."""
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
    token, generated = access_token(host, token)
    if not port_is_free(host, port):
        raise ValueError(f"port {port} on {host} is already in use: pass another with --port")
    read_only = read_only or settings.get(settings.READ_ONLY, False)
    env = {**os.environ, RUN_ENV: str(path), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           TOKEN_ENV: token or "", READ_ONLY_ENV: "1" if read_only else ""}
    if not is_loopback(host):
        print(f"saescope serve: warning: {host} is not a loopback address: other machines can reach the app, over plain "
              "HTTP (put an HTTPS proxy in front of it beyond a trusted network). Each browser session must give the "
              "access token once." + ("" if read_only else " Add --read-only to keep visitors from writing into the runs."),
              file=sys.stderr)
    if generated:
        print(f"saescope serve: access token (generated; choose one with --token or ${TOKEN_ENV}): {token}", file=sys.stderr)
    wildcard = host in ("0.0.0.0", "::", "[::]", "")
    shown_host = socket.gethostname() if wildcard else f"[{host}]" if ":" in host else host
    query = {k: v for k, v in (("run", first), ("token", token)) if v}
    link = f"http://{shown_host}:{port}" + (f"/?{urlencode(query)}" if query else "")
    print(f"saescope: serving {path} at {link}  (Ctrl-C to stop)" + ("; read-only" if read_only else ""), flush=True)
    sys.stderr.flush()
    # cwd = the repository root so Streamlit also reads .streamlit/config.toml (theme). The server replaces this
    # process: signals (Ctrl-C, SIGTERM) reach it directly, no orphan is left, and memory used to prepare a run
    # (e.g. the demo precompute) is returned.
    os.chdir(ROOT)
    return _exec(streamlit_command(host, port), env)


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def demo_runs_dir() -> Path:
    """Where the demo's runs live (one per demo SAE): ``saescope demo`` serves this directory."""
    from ..assets import data_dir

    return data_dir() / "runs"


def demo_run_dir() -> Path:
    """The main demo SAE's run (``data/runs/demo``)."""
    from .demo import DEMO_SAES

    return DEMO_SAES[0].run_dir


def demo_corpus() -> Path:
    """The held-out corpus every demo run is precomputed on (checked: it is committed)."""
    from ..assets import data_dir

    corpus = data_dir() / "corpus" / "heldout.jsonl.xz"
    if not corpus.is_file():
        raise FileNotFoundError(f"the demo corpus is missing: expected {corpus} (it is committed)")
    return corpus


FAMILY_TABLE = "family_table"
"""``data/family_table/``: the committed family table of the demo's SAEs (``saescope family-table``, docs/families.md)."""
FAMILIES_RUN = "families"
"""Where the demo serves it: ``data/runs/families``, read by the Compare page."""


def install_family_table() -> Path | None:
    """The committed family table placed in the demo's runs directory (``runs/families``) for the Compare page, when
    every SAE it measured is the committed folder of that name byte for byte (its ``digest``); None, said why, when
    there is no table or a folder differs (a retrained SAE: its row would describe other weights)."""
    import shutil

    from .. import atomic
    from ..assets import data_dir
    from ..train.family_table import INFO_FILE, TABLE_FILE, folder_digest, read_family_table

    source = data_dir() / FAMILY_TABLE
    found = read_family_table(source)
    if found is None:
        return None
    measured = found[1].get("saes", {})
    differ = [name for name, detail in measured.items()
              if not (data_dir() / name / "cfg.json").is_file() or folder_digest(data_dir() / name) != detail.get("digest")]
    dest = demo_runs_dir() / FAMILIES_RUN
    if differ:
        _say(f"not showing the committed family table: it measured other weights of {', '.join(differ)} than "
             f"{data_dir()} holds (run `saescope family-table` on them, docs/families.md)")
        if (dest / INFO_FILE).is_file() and (dest / INFO_FILE).read_bytes() == (source / INFO_FILE).read_bytes():
            shutil.rmtree(dest)  # the copy served before: a table of your own measuring is left alone
        return None
    for name in (TABLE_FILE, INFO_FILE):
        if not (dest / name).is_file() or (dest / name).read_bytes() != (source / name).read_bytes():
            dest.mkdir(parents=True, exist_ok=True)
            atomic.write_file(dest / name, lambda tmp, src=source / name: shutil.copyfile(src, tmp))
    return dest


def demo_state(demo, *, force: bool = False) -> str:
    """``run_state`` of a demo SAE's run (``stale`` when ``force``)."""
    from ..saes import load_sae

    return "stale" if force else run_state(demo.run_dir, load_sae(demo.sae_dir))


def ensure_demo_runs(names: list[str] | None = None, *, tokens: int | None = None, force: bool = False,
                     device: str = "auto", dtype: str = "auto") -> list[Path]:
    """The demo runs (``demo_saes(names)``), each precomputed here, one after another, when missing or stale (or
    ``force``); complete runs are reused, and a run another process is computing is left to it. The model is
    loaded once, by the first run that needs it."""
    from ..saes import load_sae
    from .demo import demo_saes, ensure_demo_model

    saes, corpus = demo_saes(names), demo_corpus()
    install_family_table()
    lm = None
    for i, demo in enumerate(saes, 1):
        sae = load_sae(demo.sae_dir)
        state = "stale" if force else run_state(demo.run_dir, sae)
        if state == "complete":
            _say(f"using the precomputed run {demo.run} in {demo.run_dir}")
            continue
        if state == "computing":
            _say(f"another process is computing {demo.run_dir}; leaving it to that process")
            continue
        if lm is None:
            from ..model.loading import load_model, resolve_device

            lm = load_model(ensure_demo_model(), device=resolve_device(device), dtype=dtype)
        budget = tokens or DEMO_TOKENS
        _say(f"precomputing run {demo.run} ({i}/{len(saes)}: {demo.about}) on {budget:,} held-out tokens (once)...")
        from ..precompute.pipeline import precompute

        precompute(lm, sae.to(lm.device), corpus, demo.run_dir, tokens=budget, context_len=DEMO_CONTEXT, force=True,
                   sae_path=demo.sae_dir)
    return [demo.run_dir for demo in saes]


def start_demo_runs(names: list[str] | None = None, *, tokens: int | None = None, force: bool = False,
                    device: str = "auto", dtype: str = "auto") -> Path:
    """The demo's runs directory as soon as the first chosen run (the main one by default) is browsable.

    Complete runs are used as they are. The others are precomputed by one background child, one after another
    in ``DEMO_SAES`` order (``saescope demo --no-serve``: it loads the model once, and stops with this process
    or the server that replaces it); this returns at the first run's first snapshot, at once when that run is
    complete, being computed by another process, or has an earlier partial snapshot of the same SAE to show
    meanwhile."""
    from .demo import demo_saes, ensure_demo_model

    saes = demo_saes(names)
    demo_corpus()  # refuse before starting anything
    install_family_table()
    states = {demo.run: demo_state(demo, force=force) for demo in saes}
    lead, todo = saes[0], [demo for demo in saes if states[demo.run] in ("stale", "partial")]
    for demo in saes:
        if states[demo.run] == "complete":
            _say(f"using the precomputed run {demo.run} in {demo.run_dir}")
        elif states[demo.run] == "computing":
            _say(f"another process is computing {demo.run_dir}; serving its snapshots")
    if not todo:
        return demo_runs_dir()
    model_dir = ensure_demo_model()  # fetched and converted here, in the foreground, once
    budget = tokens or DEMO_TOKENS
    cmd = [sys.executable, "-m", "engine.cli", "demo", "--no-serve", "--sae", ",".join(d.run for d in todo),
           "--tokens", str(budget), "--device", device, "--dtype", dtype, "--stop-with-parent", str(os.getpid())]
    if force:
        cmd.append("--force")
    queued = ", ".join(d.run for d in todo if d is not lead)
    _say(f"precomputing {', '.join(d.run for d in todo)} on {budget:,} held-out tokens each, one after another, in "
         f"the background (model: {model_dir.name}); the app opens at {lead.run}'s first snapshot and refines as it goes"
         + (f"; {queued}: each joins the run picker when its precompute starts" if queued else ""))
    child = start_precompute(cmd)
    if lead in todo and states[lead.run] == "stale":
        wait_for_snapshot(lead.run_dir, child)
    return demo_runs_dir()


def _say(message: str) -> None:
    print(f"saescope demo: {message}", file=sys.stderr, flush=True)


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
        if manifest is not None and (sections(manifest).snapshot.pid == child.pid or child.poll() == 0):
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
    if manifest is None:
        return "stale"  # nothing yet
    info = sections(manifest)
    if not Path(info.model.source or "").exists():
        return "stale"  # nothing yet, or the checkout moved: the live pages could not find the model
    if info.sae.hash != sae_fingerprint(sae):
        return "stale"  # the committed SAE was retrained
    if info.snapshot.final:
        return "complete"
    return "partial" if writer_alive(manifest) is False else "computing"
