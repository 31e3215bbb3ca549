"""``saescope llm-server``: its answers and log-probabilities against the model in-process, its protocol errors,
and its streams (server-sent events flushed as written, model failures, a client that goes away)."""

from __future__ import annotations

import http.client
import json
import math
import shutil
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from engine.interp import prompts
from engine.interp.backends import EndpointError, LocalChat, OpenAIChat
from engine.interp.server import make_handler, start_server
from tests.engine import interp_util
from tests.engine.interp.http_util import CONV, FAST, SERVED, explain_prompts, post

# --- answers and errors -----------------------------------------------------------------------------------------


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



# --- streaming -------------------------------------------------------------------------------------------------


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
