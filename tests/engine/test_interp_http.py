"""``saescope explain`` over HTTP against the real ``saescope llm-server`` (thread and subprocess) on a tiny chat
model, compared with the same model in-process; and the OpenAI-compatible client against endpoints that fail.
Streaming: the server's server-sent events, the client's reading of them (and of streams that break), and the
local model's stream. No network: every server here listens on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

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
        for name in (KEY_ENV, backends.TOKEN_ENV, "OPENAI_API_KEY"):
            monkeypatch.delenv(name, raising=False)
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")  # meant for OpenAI's API, not for this endpoint
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv(backends.TOKEN_ENV, "llm-server-token")
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv(KEY_ENV, "sk-saescope")
        OpenAIChat(ep.url, "m").chat([CONV])
        OpenAIChat(ep.url, "m", api_key="sk-explicit").chat([CONV])
        auth = [{k.lower(): v for k, v in r["headers"].items()}.get("authorization") for r in ep.requests]
        assert auth == [None, None, "Bearer llm-server-token", "Bearer sk-saescope", "Bearer sk-explicit"]
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


# --- streaming ---------------------------------------------------------------------------------------------------


def explain_prompts(n: int) -> list[list[dict[str, str]]]:
    """Explainer prompts that differ (so do the tiny model's replies)."""
    words = ["fox", "light", "word", "model", "numpy", "God", "bold", "quick"]
    return [prompts.explain_messages([f"the<< {words[i % 8]}>> was {i}", f"and<< {words[(i + 3) % 8]}>> here"],
                                     [words[i % 8]]) for i in range(n)]


def test_stream_from_the_llm_server_is_the_plain_answer(env):
    """Through the real server: the pieces of ``OpenAIChat.stream`` join to the non-streamed answer over HTTP and to
    the model's own answer in-process, for several prompts and lengths, and arrive as more than one piece."""
    server = start_server(env["chat"], served_name=SERVED)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        client = OpenAIChat(url, SERVED, **FAST)
        counts = []
        for messages in explain_prompts(4):
            for max_tokens in (1, 5, 32):
                pieces = list(client.stream(messages, max_tokens=max_tokens))
                assert all(isinstance(p, str) and p for p in pieces)
                assert "".join(pieces) == client.chat([messages], max_tokens=max_tokens)[0] \
                    == env["chat"].chat([messages], max_tokens=max_tokens)[0], (messages[-1]["content"], max_tokens)
                counts.append(len(pieces))
        assert max(counts) > 1, "a reply of several words arrives in several pieces"
    finally:
        server.shutdown()
        server.server_close()


def test_local_stream_is_the_chat_answer_and_frees_the_model(env, monkeypatch):
    chat = env["chat"]
    for messages in explain_prompts(3):
        for max_tokens in (3, 32):
            pieces = list(chat.stream(messages, max_tokens=max_tokens))
            assert "".join(pieces) == chat.chat([messages], max_tokens=max_tokens)[0]
    assert not chat._lock.locked()

    # the lock is held while a stream is open, and an early close stops the generation and frees it
    stream = chat.stream(explain_prompts(1)[0], max_tokens=200)
    next(stream)
    assert chat._lock.locked()
    stream.close()
    assert not chat._lock.locked()
    assert [t.name for t in threading.enumerate()].count("saescope-stream") == 0

    # an exception in the generating thread reaches the consumer after every piece the streamer made before it,
    # in order (how much of the last word the streamer flushes before the error is transformers' choice: 5.23
    # held " was" back, 5.25 sends it), the lock is released and no thread is left
    made: list[str] = []

    def breaks(enc, max_tokens, temperature, streamer=None, **kwargs):
        finalize = streamer.on_finalized_text

        def record(text, stream_end=False):
            made.append(text)
            finalize(text, stream_end=stream_end)

        streamer.on_finalized_text = record
        streamer.put(enc["input_ids"])  # the prompt (skipped)
        for token in chat.tokenizer.encode(" the word was", add_special_tokens=False):
            streamer.put(torch.tensor([token]))
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(chat, "_generate", breaks)
    got = []
    with pytest.raises(RuntimeError, match="out of memory"):
        for piece in chat.stream(explain_prompts(1)[0]):
            got.append(piece)
    assert got == [piece for piece in made if piece]
    text = "".join(got)
    assert " the word was".startswith(text) and text.startswith(" the word"), text  # whole words always come
    assert not chat._lock.locked()
    assert [t.name for t in threading.enumerate()].count("saescope-stream") == 0


def read_events(body: bytes) -> list[str]:
    """The data of each server-sent event of a complete body (events end with a blank line)."""
    text = body.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_llm_server_streams_server_sent_events(env):
    server = start_server(env["chat"], served_name="named")
    host, port = server.server_address[:2]
    messages = explain_prompts(1)[0]
    try:
        conn = http.client.HTTPConnection(str(host), port, timeout=30)
        for _ in range(2):  # one keep-alive connection carries a stream and then a plain request
            conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 16, "stream": True}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
            assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None
            events = read_events(resp.read())
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["model"] for c in chunks} == {"named"}
            assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
            assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
            deltas = [c["choices"][0]["delta"] for c in chunks]
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
            assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] == "stop"
            content = [d["content"] for d in deltas[1:-1]]
            assert all(set(d) == {"content"} for d in deltas[1:-1]) and len(content) > 1
            assert "".join(content) == env["chat"].chat([messages], max_tokens=16)[0]
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 16}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["message"]["content"] == "".join(content)

        # the first token's log-probabilities can be streamed too
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 1, "stream": True,
                                                                 "logprobs": True, "top_logprobs": 3}),
                     {"Content-Type": "application/json"})
        chunks = [json.loads(e) for e in read_events(conn.getresponse().read())[:-1]]
        top = chunks[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 3 and chunks[1]["choices"][0]["delta"]["content"] == top[0]["token"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


class FakeStreamingChat:
    """Stands in for ``LocalChat`` in the server: ``stream`` yields ``pieces``, waiting for ``gate`` (if any) after
    the first, then raises ``fail`` (if any); it records whether its stream was closed."""

    def __init__(self, pieces, gate: threading.Event | None = None, fail: Exception | None = None, forever: bool = False):
        self.pieces, self.gate, self.fail, self.forever = pieces, gate, fail, forever
        self.closed = threading.Event()

    def stream(self, messages, max_tokens=48, temperature=0.0):
        try:
            for i, piece in enumerate(self.pieces):
                yield piece
                if i == 0 and self.gate is not None:
                    assert self.gate.wait(10), "the test never saw the first piece"
            while self.forever:
                time.sleep(0.01)
                yield "more "
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed.set()


def serve(chat) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(chat, "fake"))  # pyright: ignore[reportArgumentType]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_llm_server_flushes_each_event_as_it_is_written():
    """The model only goes on once the client has read the first piece: a buffered server would deadlock here."""
    gate = threading.Event()
    server, url = serve(FakeStreamingChat(["Month ", "names ", "in dates"], gate=gate))
    try:
        pieces = OpenAIChat(url, "fake", timeout=5, **FAST).stream(CONV)
        assert next(pieces) == "Month "
        gate.set()
        assert list(pieces) == ["names ", "in dates"]
    finally:
        server.shutdown()
        server.server_close()


def test_llm_server_model_failure_while_streaming():
    server, url = serve(FakeStreamingChat(["first ", "second "], fail=RuntimeError("CUDA error")))
    try:
        got = []
        with pytest.raises(EndpointError, match="failed mid-stream.*RuntimeError: CUDA error"):
            for piece in OpenAIChat(url, "fake", **FAST).stream(CONV):
                got.append(piece)
        assert got == ["first ", "second "]
    finally:
        server.shutdown()
        server.server_close()
    server, url = serve(FakeStreamingChat([], fail=ValueError("System role not supported")))
    try:  # before the first piece: a 500 with the reason, as without streaming
        code, body = post(url + "/chat/completions", {"messages": CONV, "stream": True})
        assert code == 500 and "System role not supported" in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_llm_server_stops_the_model_when_the_client_goes_away():
    chat = FakeStreamingChat(["a "], forever=True)
    server, url = serve(chat)
    try:
        pieces = OpenAIChat(url, "fake", **FAST).stream(CONV)
        assert next(pieces) == "a " and next(pieces) == "more "
        pieces.close()  # closes the connection
        assert chat.closed.wait(10), "the server went on generating for nobody"
    finally:
        server.shutdown()
        server.server_close()


class RawEndpoint:
    """A local HTTP server whose POSTs are answered by ``respond(handler, n)`` (``n``: 1 for the first request),
    which writes the raw status line, headers and body, and may stop anywhere (the connection is then closed)."""

    def __init__(self, respond):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                owner.requests.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                respond(self, len(owner.requests))
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def sse(*events: dict | str, chunked: bool = True) -> bytes:
    """A stream response: headers, then each event (a chunk's content, or raw text)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n"
    body = b""
    for e in events:
        data = (e if isinstance(e, str) else "data: " + json.dumps(e) + "\n\n").encode()
        body += b"%X\r\n%s\r\n" % (len(data), data) if chunked else data
    return head + body


def delta(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    d: dict = {"role": "assistant"} if role else {}
    if content is not None:
        d["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


END = b"0\r\n\r\n"


def collect(stream) -> tuple[list[str], Exception | None]:
    got = []
    try:
        for piece in stream:
            got.append(piece)
    except EndpointError as err:
        return got, err
    return got, None


@pytest.mark.parametrize("chunked", [True, False])
def test_a_server_that_closes_mid_stream_is_an_endpoint_error(chunked):
    """After the first piece nothing is retried: what arrived stays with the caller, then an EndpointError."""
    with RawEndpoint(lambda h, n: h.wfile.write(sse(delta(role=True), delta("Hello"), delta(" world"), chunked=chunked))) as ep:
        got, err = collect(OpenAIChat(ep.url, "m", retries=3, backoff=0.01).stream(CONV))
        assert got == ["Hello", " world"] and isinstance(err, EndpointError) and "broke off the stream" in str(err)
        assert len(ep.requests) == 1 and ep.requests[0]["stream"] is True and ep.requests[0]["model"] == "m"


def test_stream_failures_before_the_first_piece_are_retried():
    def respond(h, n):
        if n == 1:
            h.wfile.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        elif n == 2:  # headers and the role, then the connection drops: no piece yet
            h.wfile.write(sse(delta(role=True)))
        else:
            h.wfile.write(sse(delta(role=True), delta("Month"), delta(" names"), delta(finish="stop"), "data: [DONE]\n\n") + END)

    with RawEndpoint(respond) as ep:
        assert list(OpenAIChat(ep.url, "m", retries=3, backoff=0.01).stream(CONV)) == ["Month", " names"]
        assert len(ep.requests) == 3 and ep.requests[0] == ep.requests[2]
    with RawEndpoint(lambda h, n: h.wfile.write(b"HTTP/1.1 401 No\r\nContent-Length: 7\r\n\r\nbad key")) as ep:
        with pytest.raises(EndpointError, match="refused.*HTTP 401.*bad key"):
            list(OpenAIChat(ep.url, "m", retries=3, backoff=0.01).stream(CONV))
        assert len(ep.requests) == 1
    with pytest.raises(EndpointError, match="failed after 3 attempts"):
        list(OpenAIChat(f"http://127.0.0.1:{closed_port()}/v1", "m", **FAST).stream(CONV))


def test_stream_framing_variants_are_read():
    """CRLF line ends, comments, ``data:`` without a space, a usage-only chunk, an event split over two data lines,
    and a stream that ends after its finish_reason without [DONE]."""
    body = ("data: " + json.dumps(delta(role=True)) + "\r\n\r\n"
            ": keep-alive\n\n"
            "event: message\ndata:" + json.dumps(delta("a\nb")) + "\n\n"
            'data: {"object": "chat.completion.chunk",\ndata:  "choices": [{"index": 0, "delta": {"content": " c"}}]}\n\n'
            'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n'
            "data: " + json.dumps(delta(finish="stop")) + "\n\n")
    with RawEndpoint(lambda h, n: h.wfile.write(sse(body, chunked=False))) as ep:
        assert list(OpenAIChat(ep.url, "m", **FAST).stream(CONV)) == ["a\nb", " c"]
    with ScriptedEndpoint([(200, completion("not streamed"))]) as ep:  # a server that ignores "stream"
        assert list(OpenAIChat(ep.url, "m", **FAST).stream(CONV)) == ["not streamed"]


@pytest.mark.parametrize("event, match", [("data: {not json\n\n", "malformed event"),
                                          ('data: ["a list"]\n\n', "malformed event"),
                                          ('data: {"choices": [{"index": 0}]}\n\n', "without choices"),
                                          ('data: {"choices": [{"delta": {"content": 3}}]}\n\n', "non-text delta"),
                                          ('data: {"error": {"message": "overloaded"}}\n\n', "mid-stream: overloaded")])
def test_malformed_stream_events_are_endpoint_errors(event, match):
    with RawEndpoint(lambda h, n: h.wfile.write(sse(delta("ok"), event) + END)) as ep:
        got, err = collect(OpenAIChat(ep.url, "m", retries=2, backoff=0.01).stream(CONV))
        assert got == ["ok"] and err is not None and re.search(match, str(err)), err
        assert len(ep.requests) == 1


def test_a_stalled_stream_times_out():
    def respond(h, n):
        h.wfile.write(sse(delta("slow")))
        h.wfile.flush()
        time.sleep(1.0)

    with RawEndpoint(respond) as ep:
        started = time.perf_counter()
        got, err = collect(OpenAIChat(ep.url, "m", retries=2, backoff=0.01, timeout=0.3).stream(CONV))
        assert got == ["slow"] and err is not None and "broke off the stream" in str(err) and "Timeout" in str(err)
        assert time.perf_counter() - started < 0.9 and len(ep.requests) == 1
