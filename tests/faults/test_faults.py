"""The fault-injection suite: each writing command SIGKILLed at many points, and what must hold after.

For every command (single and sharded precompute, merge, explain, evaluate, export) the harness first runs it once
counting its kill points (tests/faults/harness.py: every rename, removal, fsync and Parquet file written), then, for
points picked by a seeded schedule, runs it again in a child process that SIGKILLs itself right after that point
and checks:

* a reader never sees a run that is half one thing and half another: whenever a manifest exists, the files it
  names have the sizes it records, the index opens and every example's context is in the same run;
* the next run of the same command finishes and its output equals that of an uninterrupted run;
* nothing is left behind but a lock file: no staging, temporary or swapped-out folder.

CI runs ``FAULT_POINTS`` (default 3) points per command (``-m slow``); ``make test-faults`` runs 20 or more.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.run.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
POINTS = int(os.environ.get("FAULT_POINTS", "3"))
SEED = int(os.environ.get("FAULT_SEED", "0"))
OPTIONS = {"context_len": 16, "batch_size": 4, "tokens": 16 * 40, "snapshot_tokens": 64}
LEFTOVER_MARKS = (".tmp-", ".partial", ".old-", ".snapshots", ".shards")
pytestmark = pytest.mark.slow
REPORT: dict[str, tuple[int, int]] = {}


def child(spec: dict, tmp: Path, kill_at: int) -> int:
    """Run ``spec`` in a child process; returns its kill points (counting run) or its exit code (killed run)."""
    spec = {**spec, "kill_at": kill_at, "count_file": str(tmp / "count") if kill_at == 0 else None}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.faults.harness", str(tmp / "spec.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if kill_at == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int((tmp / "count").read_text())
    assert proc.returncode in (0, -9), proc.stderr[-3000:]
    return proc.returncode


def schedule(total: int) -> list[int]:
    rng = random.Random(f"{SEED}:{total}")
    return sorted(rng.sample(range(1, total + 1), min(POINTS, total)))


def check_reader(run: Path) -> None:
    """Whatever a reader can open is whole: sizes as recorded, an index that opens, examples whose contexts exist."""
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    folder = run / (manifest.get("data_dir") or ".")
    for name, size in (manifest.get("files") or {}).items():
        if isinstance(size, int) and name != "index.duckdb":
            assert (folder / name).stat().st_size == size, f"{name} is not the file the manifest describes"
    with RunStore.open(run) as store:
        assert store.n_features() == manifest["sae"]["d_sae"]
    examples = pq.read_table(folder / "examples.parquet", columns=["context_id"]).column(0).to_pylist()
    contexts = set(pq.read_table(folder / "contexts.parquet", columns=["context_id"]).column(0).to_pylist())
    assert set(examples) <= contexts, "examples point at contexts of another write"


def leftovers(path: Path) -> list[str]:
    found = []
    for p in path.rglob("*"):
        if any(mark in p.name for mark in LEFTOVER_MARKS):
            found.append(str(p.relative_to(path)))
    parts = path / ".interp" / "parts"
    if parts.is_dir():
        found += [f".interp/parts/{p.name}" for p in parts.iterdir()]
    return found


def run_tables(run: Path) -> dict:
    out = {}
    for name in ("features.parquet", "examples.parquet", "contexts.parquet", "tokens.parquet"):
        if (run / name).is_file():
            out[name] = pq.read_table(run / name).to_pylist()
    manifest = json.loads((run / "manifest.json").read_text())
    out["metrics"] = manifest["metrics"]
    return out


def explain_tables(run: Path) -> dict:
    out = {}
    for name in ("explanations.parquet", "scores.parquet"):
        table = pq.read_table(run / name)
        out[name] = sorted(json.dumps({k: v for k, v in r.items() if k != "created_at"}, sort_keys=True, default=str)
                           for r in table.to_pylist())
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from engine.model.tiny import save_tiny_model
    from tests.engine.interp_util import make_sae
    from tests.engine.runs_util import write_corpus

    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model(root / "model")
    sae = make_sae().save(root / "sae")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=24)
    return {"model": str(model), "sae": str(sae), "corpus": str(corpus), "root": root}


def precompute_spec(inputs, out: Path, command: str = "precompute", **extra) -> dict:
    return {"command": command, "args": {"model": inputs["model"], "sae": inputs["sae"], "corpus": inputs["corpus"],
                                          "out": str(out), "options": OPTIONS, **extra}}


def crash_and_resume(name: str, spec_for, prepare, check, resume, compare, tmp_path: Path) -> None:
    """Count the points on a fresh copy of the input, then for each scheduled point: prepare, kill, check, resume
    in this process, compare with the uninterrupted result."""
    base = tmp_path / "count"
    base.mkdir(parents=True)
    prepare(base)
    total = child(spec_for(base), base, 0)
    reference = compare(base)
    assert not leftovers(base / "run"), leftovers(base / "run")
    points = schedule(total)
    for point in points:
        work = tmp_path / f"kill-{point}"
        work.mkdir()
        prepare(work)
        child(spec_for(work), work, point)
        check(work)
        resume(work)
        assert compare(work) == reference, f"{name}: resumed after kill point {point} differs"
        assert not leftovers(work / "run"), (point, leftovers(work / "run"))
    REPORT[name] = (total, len(points))
    print(f"\nfaults: {name}: {len(points)} kill points of {total}: {points}")


def test_precompute_survives_kills(inputs, tmp_path):
    from engine.model.loading import load_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    lm = load_model(inputs["model"], device="cpu", dtype="float32")
    crash_and_resume(
        "precompute", lambda w: precompute_spec(inputs, w / "run"), lambda w: None, lambda w: check_reader(w / "run"),
        lambda w: precompute(lm, load_sae(inputs["sae"]), inputs["corpus"], w / "run", progress=False,
                             sae_path=inputs["sae"], **OPTIONS),
        lambda w: run_tables(w / "run"), tmp_path)


def test_sharded_precompute_and_merge_survive_kills(inputs, tmp_path):
    from engine.precompute.distributed import precompute_sharded
    from engine.precompute.merge import merge_run

    def resume(w):
        precompute_sharded(inputs["model"], inputs["sae"], inputs["corpus"], w / "run", shards=2, runner="inline",
                           device="cpu", dtype="float32", progress=False, **OPTIONS)

    crash_and_resume("precompute --shards 2", lambda w: precompute_spec(inputs, w / "run", "sharded"), lambda w: None,
                     lambda w: check_reader(w / "run"), resume, lambda w: run_tables(w / "run"), tmp_path / "sharded")

    planned = tmp_path / "planned"
    precompute_sharded(inputs["model"], inputs["sae"], inputs["corpus"], planned, shards=2, runner="inline",
                       device="cpu", dtype="float32", progress=False, merge=False, **OPTIONS)

    def prepare(w):
        shutil.copytree(planned, w / "run")

    crash_and_resume("merge", lambda w: {"command": "merge", "args": {"out": str(w / "run")}}, prepare,
                     lambda w: check_reader(w / "run"), lambda w: merge_run(w / "run", progress=False),
                     lambda w: run_tables(w / "run"), tmp_path / "merge")


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    from engine.model.loading import load_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    run = tmp_path_factory.mktemp("finished") / "run"
    lm = load_model(inputs["model"], device="cpu", dtype="float32")
    precompute(lm, load_sae(inputs["sae"]), inputs["corpus"], run, progress=False, sae_path=inputs["sae"], **OPTIONS)
    return run


EXPLAIN = {"features": "0-5", "batch_size": 2, "pool_contexts": 16, "n_shown": 4, "n_heldout": 4}


def test_explain_survives_kills(finished, tmp_path):
    from engine.interp.explain import ExplainConfig, explain_run
    from tests.engine.interp_util import ScriptedChat

    def check(w):
        check_reader(w / "run")
        for name in ("explanations.parquet", "scores.parquet"):
            if (w / "run" / name).is_file():
                pq.read_table(w / "run" / name)  # whole, or absent

    crash_and_resume(
        "explain", lambda w: {"command": "explain", "args": {"run": str(w / "run"), "options": EXPLAIN}},
        lambda w: shutil.copytree(finished, w / "run"), check,
        lambda w: explain_run(w / "run", ScriptedChat(), cfg=ExplainConfig(**EXPLAIN), progress=False),
        lambda w: explain_tables(w / "run"), tmp_path)


def test_export_survives_kills(finished, tmp_path):
    from engine.tools.export import export_run

    def prepare(w):
        shutil.copytree(finished, w / "run")
        export_run(w / "run", w / "out.jsonl", "jsonl")  # an earlier export that a --force run replaces
        (w / "earlier").write_bytes((w / "out.jsonl").read_bytes())

    def check(w):
        # the earlier export whole, or the new one whole (the same bytes: the same run), never a part of one
        assert (w / "out.jsonl").read_bytes() == (w / "earlier").read_bytes()

    spec = lambda w: {"command": "export", "args": {"run": str(w / "run"), "out": str(w / "out.jsonl"),  # noqa: E731
                                                     "format": "jsonl", "force": True}}
    crash_and_resume("export", spec, prepare, check,
                     lambda w: export_run(w / "run", w / "out.jsonl", "jsonl", force=True),
                     lambda w: (w / "out.jsonl").read_bytes(), tmp_path)


def test_evaluate_survives_kills(finished, tmp_path):
    from engine.eval.evaluate import EvaluateConfig, evaluate_run

    options = {"parts": ["core"], "tokens": 256, "batch_size": 4}

    def compare(w):
        table = pq.read_table(w / "run" / "evaluation.parquet")
        return table.drop_columns([c for c in table.column_names if "second" in c]).to_pylist()

    def check(w):
        check_reader(w / "run")
        if (w / "run" / "evaluation.parquet").is_file():
            pq.read_table(w / "run" / "evaluation.parquet")

    crash_and_resume(
        "evaluate", lambda w: {"command": "evaluate", "args": {"run": str(w / "run"), "options": options}},
        lambda w: shutil.copytree(finished, w / "run"), check,
        lambda w: evaluate_run(w / "run", EvaluateConfig(**{**options, "parts": tuple(options["parts"])}),
                               device="cpu", dtype="float32"),
        compare, tmp_path)


def test_two_writers_started_at_once_one_wins(inputs, tmp_path):
    """Two ``saescope precompute`` processes into one run directory at the same moment: one writes the run, the
    other is refused naming it, and the run equals an uninterrupted one."""
    from engine.model.loading import load_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae
    from tests.engine.runs_util import write_corpus

    out = tmp_path / "run"
    corpus = str(write_corpus(tmp_path / "long.jsonl", n_docs=400))  # a pass of seconds: the two overlap
    options = {**OPTIONS, "tokens": 16 * 1200}
    cmd = [sys.executable, "-m", "engine.cli", "precompute", "--model", inputs["model"], "--sae", inputs["sae"],
           "--corpus", corpus, "--out", str(out), "--dtype", "float32", "--device", "cpu",
           *[f for k, v in options.items() for f in (f"--{k.replace('_', '-')}", str(v))]]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code != 0]
    assert codes == [0, 2], results
    assert "is being written by `saescope precompute" in refused[0] and "pid" in refused[0]
    reference = tmp_path / "reference"
    lm = load_model(inputs["model"], device="cpu", dtype="float32")
    precompute(lm, load_sae(inputs["sae"]), corpus, reference, progress=False, **options)
    assert run_tables(out) == run_tables(reference)
    assert not leftovers(out)
