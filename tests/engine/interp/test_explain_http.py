"""``saescope explain`` over HTTP: against the real ``saescope llm-server`` (thread and subprocess) on a tiny chat
model, compared with the same model in-process; and against endpoints that are unreachable or refuse."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import cli
from engine.interp import parts, prompts, schema, scorers
from engine.interp.backends import KEY_ENV, EndpointError, OpenAIChat
from engine.interp.data import RunExamples
from engine.interp.embed import Embedder
from engine.interp.explain import ExplainConfig, explain_messages, explain_run, quiet_pool
from engine.run import rundir
from tests.engine.interp.http_util import FAST, SERVED, closed_port, fresh_run
from tests.engine.interp_util import DEAD, ScriptedChat, ScriptedEndpoint

# --- end to end over HTTP ------------------------------------------------------------------------------------


def test_explain_over_http_matches_the_model_in_process(env, monkeypatch):
    run = fresh_run(env, "e2e")
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    env["auth"].clear()
    backend = OpenAIChat(env["url"], SERVED, concurrency=2, **FAST)
    embedder = Embedder(env["embedder"])
    cfg = ExplainConfig(features="0-4,5,77", batch_size=4, n_shown=4, n_heldout=4, pool_contexts=48)
    stats = explain_run(run, backend, embedder=embedder, cfg=cfg, progress=False)

    ids = [0, 1, 2, 3, 4, 5, 77]
    assert stats["features"] == 7 and stats["skipped"] == len(DEAD) and stats["explained"] + stats["failed"] == 5
    assert stats["explained"] >= 3, "the tiny chat model should give mostly usable (lettered) answers"
    assert not [p for p in parts.parts_dir(run).iterdir() if not p.name.startswith(".")], "parts are folded in"
    ex = pq.read_table(run / schema.EXPLANATIONS).to_pylist()
    sc = pq.read_table(run / schema.SCORES).to_pylist()
    em = pq.read_table(run / schema.EMBEDDINGS).to_pylist()
    assert sorted(r["feature_id"] for r in ex) == ids
    assert {r["explainer"] for r in ex} == {f"openai:{SERVED}@{env['url']}"}
    assert {r["prompt_version"] for r in ex} == {prompts.EXPLAIN_VERSION}
    by_id = {r["feature_id"]: r for r in ex}
    for fid in DEAD:
        assert by_id[fid]["status"] == "skipped" and by_id[fid]["explanation"] is None and by_id[fid]["reason"]
    ok = sorted(f for f, r in by_id.items() if r["status"] == "ok")
    assert all(by_id[f]["explanation"] and not by_id[f]["reason"] for f in ok)
    assert sorted((r["feature_id"], r["scorer"]) for r in sc) == [(f, s) for f in ok for s in sorted(scorers.SCORERS)]
    assert sorted(r["feature_id"] for r in em) == ok
    for r in em:
        vec = np.asarray(r["embedding"], np.float32)
        assert r["model"] == "embedder" and vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        np.testing.assert_allclose(vec, embedder.encode([by_id[r["feature_id"]]["explanation"]])[0], atol=1e-6)

    # the explanations are what the same model answers in-process (greedy) for the same prompt
    chat = env["chat"]
    examples = RunExamples(run, before=cfg.before, after=cfg.after)
    try:
        lats = {lat.feature_id: lat for lat in examples.latents(ids, n_shown=4, n_top_heldout=2, n_quantile_heldout=2)}
        pool = quiet_pool(run, rundir.read_manifest(run), examples, cfg)
        for fid in ids:
            if fid in DEAD:
                assert not lats[fid].shown
                continue
            answer = chat.chat([explain_messages(lats[fid])], max_tokens=cfg.max_tokens)[0]
            text, reason = prompts.clean_explanation(answer)
            assert by_id[fid]["explanation"] == text, fid
            if text is None:
                assert by_id[fid]["status"] == "failed" and by_id[fid]["reason"].startswith(reason)
        # the scorers' probabilities over HTTP are the in-process ones, excerpt by excerpt
        stored = {(r["feature_id"], r["scorer"]): r for r in sc}
        for fid in ok:
            excerpts = lats[fid].heldout + examples.quiet_excerpts(pool, fid, len(lats[fid].heldout), cfg.seed,
                                                                   exclude={e.context_id for e in lats[fid].shown})
            text = by_id[fid]["explanation"]
            for local in (scorers.detection(chat, text, excerpts), scorers.fuzzing(chat, text, excerpts, seed=cfg.seed + fid)):
                row = stored[(fid, local.scorer)]
                details = json.loads(row["details"])
                assert row["n_examples"] == len(excerpts) and details["context_ids"] == local.details["context_ids"]
                np.testing.assert_allclose(details["probabilities"], local.details["probabilities"], atol=2e-4)
                assert (row["score"] is None and math.isnan(local.score)) or row["score"] == pytest.approx(local.score)
    finally:
        examples.close()
    assert env["auth"] and set(env["auth"]) == {"Bearer sk-test-123"}


def test_cli_explain_against_llm_server_subprocess(env, capsys):
    """Both commands as a user runs them: ``saescope llm-server`` in its own process, ``saescope explain`` here."""
    run = fresh_run(env, "cli")
    environ = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "llm-server", "--model", str(env["chat_dir"]), "--name",
                             SERVED, "--port", "0", "--device", "cpu", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                            cwd=Path(__file__).resolve().parents[3])
    try:
        line = proc.stdout.readline()
        assert "llm-server" in line and SERVED in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        rc = cli.main(["explain", str(run), "--explainer", url, "--explainer-model", SERVED, "--features", "0-2",
                       "--scorers", "detection", "--no-embed", "--batch-size", "2", "--pool-contexts", "32",
                       "--device", "cpu"])
        out = capsys.readouterr().out
        assert rc == 0
        stats = json.loads(out)
        assert stats["features"] == 3 and stats["explained"] + stats["failed"] == 3
        ex = pq.read_table(run / schema.EXPLANATIONS).to_pylist()
        sc = pq.read_table(run / schema.SCORES).to_pylist()
        assert [r["feature_id"] for r in ex] == [0, 1, 2]
        assert sorted(r["feature_id"] for r in sc) == [r["feature_id"] for r in ex if r["status"] == "ok"]
        assert {r["scorer"] for r in sc} <= {"detection"} and not (run / schema.EMBEDDINGS).exists()
        assert f"openai:{SERVED}@{url}" in stats["mean_scores"] or not sc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


# --- explain against failing endpoints -------------------------------------------------------------------------


def test_unreachable_endpoint_mid_run_keeps_what_was_written(env, monkeypatch, capsys):
    run = fresh_run(env, "unreachable")
    cfg = ExplainConfig(features="0-3", scorers=("detection",), batch_size=2, n_heldout=4, pool_contexts=32)
    first = ScriptedChat()
    explain_run(run, first, cfg=cfg, progress=False)
    before = (run / schema.EXPLANATIONS).read_bytes(), (run / schema.SCORES).read_bytes()

    dead_url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(EndpointError):
        explain_run(run, OpenAIChat(dead_url, "m", **FAST), cfg=ExplainConfig(**{**cfg.__dict__, "features": "0-7"}),
                    progress=False)
    assert ((run / schema.EXPLANATIONS).read_bytes(), (run / schema.SCORES).read_bytes()) == before
    ex = parts.read_all(run, schema.EXPLANATIONS)
    assert ex["feature_id"].to_pylist() == [0, 1, 2, 3] and set(ex["explainer"].to_pylist()) == {"scripted"}

    # the command says what happened and that a rerun continues; with small backoff it is quick
    monkeypatch.setitem(OpenAIChat.__init__.__kwdefaults__, "backoff", 0.01)
    started = time.perf_counter()
    rc = cli.main(["explain", str(run), "--explainer", dead_url, "--explainer-model", "m", "--features", "0-7",
                   "--scorers", "detection", "--no-embed", "--pool-contexts", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "saescope explain: error:" in err and "rerun to continue" in err and "Traceback" not in err
    assert time.perf_counter() - started < 10
    assert parts.read_all(run, schema.EXPLANATIONS)["feature_id"].to_pylist() == [0, 1, 2, 3]


def test_a_400_from_the_endpoint_stops_the_run_without_retrying(env):
    run = fresh_run(env, "refused")
    with ScriptedEndpoint([(400, {"error": {"message": "model not found"}})]) as ep:
        with pytest.raises(EndpointError, match="model not found"):
            explain_run(run, OpenAIChat(ep.url, "nope", concurrency=2, **FAST),
                        cfg=ExplainConfig(features="0-7", scorers=(), batch_size=4, pool_contexts=32), progress=False)
        sent = [json.dumps(r["json"]["messages"]) for r in ep.requests]
        assert 1 <= len(sent) <= 4 and len(set(sent)) == len(sent), "no request is retried, and the run stops at batch 1"
    assert parts.read_all(run, schema.EXPLANATIONS).num_rows == 0
