"""The OpenAI-compatible client (``OpenAIChat``) against endpoints that fail, stall or misbehave: what is retried,
what is not, timeouts, bounded concurrency, the API key it sends, and ``yes_probability`` read from replies."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from engine.interp import backends
from engine.interp.backends import KEY_ENV, EndpointError, OpenAIChat
from tests.engine.interp.http_util import CONV, FAST, closed_port
from tests.engine.interp_util import ScriptedEndpoint, completion


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
