"""The OpenAI-compatible client reading streams (``OpenAIChat.stream``): server-sent event framings, streams that
break, stall or carry malformed events, and which failures are retried (only those before the first piece)."""

from __future__ import annotations

import json
import re
import time

import pytest

from engine.interp.backends import EndpointError, OpenAIChat
from tests.engine.interp.http_util import CONV, FAST, closed_port
from tests.engine.interp_util import LocalServer, QuietHandler, ScriptedEndpoint, completion


class RawEndpoint(LocalServer):
    """A local HTTP server whose POSTs are answered by ``respond(handler, n)`` (``n``: 1 for the first request),
    which writes the raw status line, headers and body, and may stop anywhere (the connection is then closed)."""

    def __init__(self, respond):
        self.requests: list[dict] = []
        owner = self

        class Handler(QuietHandler):
            def do_POST(self):
                owner.requests.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                respond(self, len(owner.requests))
                self.wfile.flush()
                self.close_connection = True

        self.start(Handler)


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
