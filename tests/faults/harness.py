"""Crash injection for the fault suite (tests/faults/test_faults.py), modelled on SQLite's crash tests.

Run as ``python -m tests.faults.harness SPEC.json``: it runs one saescope command (``COMMANDS``) in this process
with every file-system step that makes a write visible counted as a *kill point*: a file created or closed by
pyarrow, a rename, a removal, an fsync. With ``kill_at = N`` the process sends itself SIGKILL right after the
N-th point (no clean-up, no ``finally``: what a power cut or the OOM killer does); with ``kill_at = 0`` it only
counts, and writes the number of points it passed to ``count_file``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

_seen = 0
_kill_at = 0


def _point() -> None:
    global _seen
    _seen += 1
    if _kill_at and _seen >= _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _after(fn):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        _point()
        return result
    return wrapped


def install(kill_at: int) -> None:
    """Count (and at ``kill_at``, die at) each visible write step."""
    global _kill_at
    import pyarrow.parquet as pq

    _kill_at = kill_at
    os.replace = _after(os.replace)
    os.rename = _after(os.rename)
    os.unlink = _after(os.unlink)
    os.fsync = _after(os.fsync)
    shutil.rmtree = _after(shutil.rmtree)
    pq.write_table = _after(pq.write_table)
    pq.ParquetWriter.close = _after(pq.ParquetWriter.close)


def run(spec: dict) -> None:
    from engine.model.loading import load_model
    from engine.saes import load_sae

    command, args = spec["command"], spec["args"]
    if command == "precompute":
        from engine.precompute.pipeline import precompute

        lm = load_model(args["model"], device="cpu", dtype="float32")
        precompute(lm, load_sae(args["sae"]), args["corpus"], args["out"], progress=False, sae_path=args["sae"],
                   force=args.get("force", False), **args["options"])
    elif command == "sharded":
        from engine.precompute.distributed import precompute_sharded

        precompute_sharded(args["model"], args["sae"], args["corpus"], args["out"], shards=2, runner="inline",
                           device="cpu", dtype="float32", progress=False, merge=args.get("merge", True),
                           force=args.get("force", False), **args["options"])
    elif command == "merge":
        from engine.precompute.merge import merge_run

        merge_run(args["out"], progress=False)
    elif command == "explain":
        from engine.interp.explain import ExplainConfig, explain_run
        from tests.engine.interp_util import ScriptedChat

        explain_run(args["run"], ScriptedChat(), cfg=ExplainConfig(**args["options"]), progress=False)
    elif command == "export":
        from engine.tools.export import export_run

        export_run(args["run"], args["out"], args["format"], force=args.get("force", False))
    elif command == "evaluate":
        from engine.eval.evaluate import EvaluateConfig, evaluate_run

        evaluate_run(args["run"], EvaluateConfig(**args["options"]), device="cpu", dtype="float32")
    else:
        raise SystemExit(f"unknown command {command}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    install(int(spec.get("kill_at", 0)))
    run(spec)
    if spec.get("count_file"):
        Path(spec["count_file"]).write_text(str(_seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
