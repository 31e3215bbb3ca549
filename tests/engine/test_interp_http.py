"""``saescope explain`` over HTTP against the real ``saescope llm-server`` (thread and subprocess) on a tiny chat
model, compared with the same model in-process; and the OpenAI-compatible client against endpoints that fail.
No network: every server here listens on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import cli
from engine.interp import backends, prompts, scorers, storage
from engine.interp.backends import KEY_ENV, EndpointError, LocalChat, OpenAIChat
from engine.interp.data import RunExamples
from engine.interp.embed import Embedder
from engine.interp.explain import ExplainConfig, explain_messages, explain_run, quiet_pool
from engine.interp.server import make_handler, start_server
from engine.run import rundir

from . import interp_util
from .interp_util import DEAD, ScriptedChat, ScriptedEndpoint, build_run, completion, save_chat_model, save_embedder

SERVED = "tiny-chat"
FAST = {"retries": 2, "backoff": 0.01}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A finished run, a tiny chat model served by the real llm-server handler (recording Authorization
    headers), the same model in-process, and a tiny embedder folder."""
    root = tmp_path_factory.mktemp("interp_http")
    run = build_run(root / "build")
    chat_dir = save_chat_model(root / "chat")
    chat = LocalChat(str(chat_dir), device="cpu", dtype="float32")
    auth: list[str | None] = []

    class Recording(make_handler(chat, SERVED)):
        def do_POST(self):
            auth.append(self.headers.get("Authorization"))
            super().do_POST()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"root": root, "run": run, "chat_dir": chat_dir, "chat": chat, "auth": auth,
           "url": f"http://127.0.0.1:{server.server_address[1]}/v1", "embedder": save_embedder(root / "embedder")}
    server.shutdown()
    server.server_close()


def fresh_run(env, name: str) -> Path:
    """A copy of the finished run (explain writes into its run directory)."""
    out = env["root"] / name
    shutil.copytree(env["run"], out)
    return out


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


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
    assert not [p for p in storage.parts_dir(run).iterdir() if not p.name.startswith(".")], "parts are folded in"
    ex = pq.read_table(run / storage.EXPLANATIONS).to_pylist()
    sc = pq.read_table(run / storage.SCORES).to_pylist()
    em = pq.read_table(run / storage.EMBEDDINGS).to_pylist()
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


def test_yes_probability_over_http_equals_local(env):
    chat = env["chat"]
    convs = [prompts.detection_messages(f"feature {i}", f"the quick brown fox {i * 7} jumps") for i in range(3)]
    convs += [prompts.fuzzing_messages("tokens " * (i + 1), "In the<< beginning>> was " * (i + 1)) for i in range(3)]
    status, reply = post(env["url"] + "/chat/completions", {"model": SERVED, "messages": convs[0], "max_tokens": 1,
                                                          "logprobs": True, "top_logprobs": 10})
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert status == 200 and {"1", "0"} <= {t["token"] for t in top}, "the test model puts the digits in its top 10"
    assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-5
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert reply["choices"][0]["message"]["content"] == chat.chat([convs[0]], max_tokens=1)[0] == top[0]["token"]
    remote = OpenAIChat(env["url"], SERVED, concurrency=3, **FAST).yes_probability(convs)
    local = chat.yes_probability(convs)
    np.testing.assert_allclose(remote, local, atol=1e-4)
    assert np.ptp(local) > 1e-3, "the prompts give different probabilities, so a mix-up would show"


def test_llm_server_protocol_errors(env):
    server = start_server(env["chat"], served_name="named")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["named"]
        msgs = [{"role": "user", "content": "hi"}]
        assert post(url + "/v1/chat/completions", b"{not json")[0] == 400
        assert post(url + "/v1/chat/completions", {"messages": "hi"})[0] == 400
        assert post(url + "/v1/chat/completions", {"messages": []})[0] == 400
        assert post(url + "/v1/chat/completions", ["not", "an", "object"])[0] == 400
        for bad in ({"max_tokens": 0}, {"max_tokens": 5000}, {"max_tokens": "many"},
                    {"max_tokens": 1, "logprobs": True, "top_logprobs": 100000},
                    {"max_tokens": 1, "logprobs": True, "top_logprobs": "x"}):
            code, body = post(url + "/v1/chat/completions", {"messages": msgs, **bad})
            assert code == 400 and body["error"]["message"].startswith("bad request"), bad
        code, body = post(url + "/v1/elsewhere", {"messages": msgs})
        assert code == 404 and "elsewhere" in body["error"]["message"]
        code, body = post(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 3})
        assert code == 200 and body["model"] == "named" and body["choices"][0]["message"]["content"] == \
            env["chat"].chat([msgs], max_tokens=3)[0]
    finally:
        server.shutdown()
        server.server_close()


def test_llm_server_answers_500_with_the_reason_when_the_model_fails(env, tmp_path):
    """A chat template that refuses system messages (as Gemma's does) fails in the model call: the client gets a
    500 with the template's message, not a dropped connection it would retry as a network error."""
    folder = tmp_path / "no-system"
    shutil.copytree(env["chat_dir"], folder)
    (folder / "chat_template.jinja").write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                                                "'System role not supported') }}{% endif %}" + interp_util.CHAT_TEMPLATE)
    server = start_server(LocalChat(str(folder), device="cpu", dtype="float32"))
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        code, body = post(url + "/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
        assert code == 500 and "System role not supported" in body["error"]["message"]
        with pytest.raises(EndpointError, match="HTTP 500.*System role not supported"):
            OpenAIChat(url, "m", **FAST).yes_probability([prompts.detection_messages("a", "b")])
        assert post(url + "/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_cli_explain_against_llm_server_subprocess(env, capsys):
    """Both commands as a user runs them: ``saescope llm-server`` in its own process, ``saescope explain`` here."""
    run = fresh_run(env, "cli")
    environ = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "llm-server", "--model", str(env["chat_dir"]), "--name",
                             SERVED, "--port", "0", "--device", "cpu", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                            cwd=Path(__file__).resolve().parents[2])
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
        ex = pq.read_table(run / storage.EXPLANATIONS).to_pylist()
        sc = pq.read_table(run / storage.SCORES).to_pylist()
        assert [r["feature_id"] for r in ex] == [0, 1, 2]
        assert sorted(r["feature_id"] for r in sc) == [r["feature_id"] for r in ex if r["status"] == "ok"]
        assert {r["scorer"] for r in sc} <= {"detection"} and not (run / storage.EMBEDDINGS).exists()
        assert f"openai:{SERVED}@{url}" in stats["mean_scores"] or not sc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


# --- the client against endpoints that fail --------------------------------------------------------------------

CONV = [{"role": "user", "content": "hello"}]


def test_http_400_is_not_retried():
    with ScriptedEndpoint([(400, {"error": {"message": "no such model"}})]) as ep:
        with pytest.raises(EndpointError, match="refused.*HTTP 400.*no such model"):
            OpenAIChat(ep.url, "m", retries=3, backoff=0.01).chat([CONV])
        assert len(ep.requests) == 1


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_errors_are_retried(status):
    with ScriptedEndpoint([(status, {"error": "busy"}), (200, completion("a short phrase"))]) as ep:
        assert OpenAIChat(ep.url, "m", retries=3, backoff=0.01).chat([CONV]) == ["a short phrase"]
        assert len(ep.requests) == 2
        assert ep.requests[0]["json"] == ep.requests[1]["json"]


def test_persistent_failure_gives_up_after_the_retries():
    with ScriptedEndpoint([(503, {"error": "down"})]) as ep:
        with pytest.raises(EndpointError, match="failed after 3 attempts: HTTP 503"):
            OpenAIChat(ep.url, "m", retries=2, backoff=0.01).chat([CONV])
        assert len(ep.requests) == 3


@pytest.mark.parametrize("body, match", [(b"<html>oops</html>", "invalid JSON"), ({"choices": []}, "without choices"),
                                         ({"object": "error"}, "without choices")])
def test_malformed_replies_are_endpoint_errors(body, match):
    with ScriptedEndpoint([(200, body)]) as ep:
        with pytest.raises(EndpointError, match=match):
            OpenAIChat(ep.url, "m", retries=1, backoff=0.01).chat([CONV])


def test_unreachable_endpoint_fails_fast():
    started = time.perf_counter()
    with pytest.raises(EndpointError, match="failed after 3 attempts"):
        OpenAIChat(f"http://127.0.0.1:{closed_port()}/v1", "m", **FAST).chat([CONV] * 8)
    assert time.perf_counter() - started < 3


def test_a_server_that_does_not_speak_http_is_an_endpoint_error():
    """Pointing --explainer at the wrong port (say, an SSH or database server) is a clear error, not a traceback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def babble():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=babble, daemon=True)
        thread.start()
        try:
            with pytest.raises(EndpointError):
                OpenAIChat(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "m", **FAST).chat([CONV])
        finally:
            stop.set()
            thread.join()


def test_timeouts_are_retried_then_fail():
    with ScriptedEndpoint([(200, completion("late"))], delay=0.6) as ep:
        started = time.perf_counter()
        with pytest.raises(EndpointError, match="failed after 2 attempts"):
            OpenAIChat(ep.url, "m", retries=1, backoff=0.01, timeout=0.2).chat([CONV])
        assert time.perf_counter() - started < 1.5


def test_concurrency_is_bounded_and_order_kept():
    echo = (200, lambda req: completion(req["messages"][-1]["content"].upper()))
    with ScriptedEndpoint([echo], delay=0.15) as ep:
        convs = [[{"role": "user", "content": f"c{i}"}] for i in range(12)]
        assert OpenAIChat(ep.url, "m", concurrency=3).chat(convs) == [f"C{i}" for i in range(12)]
        assert ep.max_in_flight == 3


def test_api_key_is_sent_as_bearer(monkeypatch):
    with ScriptedEndpoint([(200, completion("x"))]) as ep:
        monkeypatch.delenv(KEY_ENV, raising=False)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv(KEY_ENV, "sk-saescope")
        OpenAIChat(ep.url, "m").chat([CONV])
        OpenAIChat(ep.url, "m", api_key="sk-explicit").chat([CONV])
        auth = [{k.lower(): v for k, v in r["headers"].items()}.get("authorization") for r in ep.requests]
        assert auth == [None, "Bearer sk-openai", "Bearer sk-saescope", "Bearer sk-explicit"]
        assert all(r["path"] == "/v1/chat/completions" and r["json"]["model"] == "m" for r in ep.requests)


def test_yes_probability_reads_top_logprobs_else_the_text():
    def lp(*pairs):
        return {"content": [{"token": pairs[0][0], "logprob": pairs[0][1],
                             "top_logprobs": [{"token": t, "logprob": v} for t, v in pairs]}]}

    replies = [
        completion("1", lp(("1", math.log(0.6)), (" 1", math.log(0.1)), ("0", math.log(0.2)), ("x", math.log(0.1)))),
        completion("0"),
        completion(" 1"),
        completion("maybe"),
        completion("x", lp(("x", -0.1), ("y", -3.0))),
    ]
    with ScriptedEndpoint([(200, lambda req: replies[int(req["messages"][-1]["content"])])]) as ep:
        got = OpenAIChat(ep.url, "m").yes_probability([[{"role": "user", "content": str(i)}] for i in range(5)])
        assert got == pytest.approx([0.7 / 0.9, 0.0, 1.0, 0.5, 0.5])
        req = ep.requests[0]["json"]
        assert req["max_tokens"] == 1 and req["logprobs"] is True and req["top_logprobs"] >= 2 and req["temperature"] == 0


def test_make_backend_needs_a_model_name_for_an_endpoint():
    with pytest.raises(ValueError, match="--explainer-model"):
        backends.make_backend("http://127.0.0.1:1/v1")
    assert isinstance(backends.make_backend("http://127.0.0.1:1/v1/", model="m"), OpenAIChat)


# --- explain against failing endpoints -------------------------------------------------------------------------


def test_unreachable_endpoint_mid_run_keeps_what_was_written(env, monkeypatch, capsys):
    run = fresh_run(env, "unreachable")
    cfg = ExplainConfig(features="0-3", scorers=("detection",), batch_size=2, n_heldout=4, pool_contexts=32)
    first = ScriptedChat()
    explain_run(run, first, cfg=cfg, progress=False)
    before = (run / storage.EXPLANATIONS).read_bytes(), (run / storage.SCORES).read_bytes()

    dead_url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(EndpointError):
        explain_run(run, OpenAIChat(dead_url, "m", **FAST), cfg=ExplainConfig(**{**cfg.__dict__, "features": "0-7"}),
                    progress=False)
    assert ((run / storage.EXPLANATIONS).read_bytes(), (run / storage.SCORES).read_bytes()) == before
    ex = storage.read_all(run, storage.EXPLANATIONS)
    assert ex["feature_id"].to_pylist() == [0, 1, 2, 3] and set(ex["explainer"].to_pylist()) == {"scripted"}

    # the command says what happened and that a rerun continues; with small backoff it is quick
    monkeypatch.setitem(OpenAIChat.__init__.__kwdefaults__, "backoff", 0.01)
    started = time.perf_counter()
    rc = cli.main(["explain", str(run), "--explainer", dead_url, "--explainer-model", "m", "--features", "0-7",
                   "--scorers", "detection", "--no-embed", "--pool-contexts", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "saescope explain: error:" in err and "rerun to continue" in err and "Traceback" not in err
    assert time.perf_counter() - started < 10
    assert storage.read_all(run, storage.EXPLANATIONS)["feature_id"].to_pylist() == [0, 1, 2, 3]


def test_a_400_from_the_endpoint_stops_the_run_without_retrying(env):
    run = fresh_run(env, "refused")
    with ScriptedEndpoint([(400, {"error": {"message": "model not found"}})]) as ep:
        with pytest.raises(EndpointError, match="model not found"):
            explain_run(run, OpenAIChat(ep.url, "nope", concurrency=2, **FAST),
                        cfg=ExplainConfig(features="0-7", scorers=(), batch_size=4, pool_contexts=32), progress=False)
        sent = [json.dumps(r["json"]["messages"]) for r in ep.requests]
        assert 1 <= len(sent) <= 4 and len(set(sent)) == len(sent), "no request is retried, and the run stops at batch 1"
    assert storage.read_all(run, storage.EXPLANATIONS).num_rows == 0
