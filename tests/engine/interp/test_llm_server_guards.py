"""``saescope llm-server`` under hostile or careless clients: a token (required beyond loopback), Host and Origin
checks (DNS rebinding, browsers' cross-origin requests), JSON only, a cap on requests in flight, prompts bounded by
the model's context, and socket timeouts, so a client that stops reading cannot hold the model. Real servers on
127.0.0.1, the real tiny chat model where the model matters."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.interp.backends import TOKEN_ENV, LocalChat, OpenAIChat
from engine.interp.server import ServerConfig, make_server, start_server
from tests.engine.interp_util import save_chat_model

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return LocalChat(str(save_chat_model(tmp_path_factory.mktemp("guards") / "chat")), device="cpu", dtype="float32")


def request(port: int, method: str = "POST", path: str = "/v1/chat/completions", body: dict | bytes | None = None,
            headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request over a fresh connection to ``host:port``."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    conn.close()
    return out


class served:
    """``start_server`` as a context manager: (server, port)."""

    def __init__(self, chat, **kwargs):
        self.server = start_server(chat, **kwargs)

    def __enter__(self):
        return self.server, self.server.server_address[1]

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_beyond_loopback_a_token_is_required(chat):
    with pytest.raises(ValueError, match="not loopback.* needs a token"):
        make_server(chat, host="0.0.0.0")
    with served(chat, host="0.0.0.0", config=ServerConfig(token="s3cret-token-123")) as (_, port):
        body = {"messages": MSG, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token-123"}):
            code, reply, got = request(port, body=body, headers=headers)
            assert code == 401 and "Authorization: Bearer" in reply["error"]["message"], headers
            assert got["WWW-Authenticate"].startswith("Bearer")
        assert request(port, "GET", "/v1/models")[0] == 401
        auth = {"Authorization": "Bearer s3cret-token-123"}
        assert request(port, "GET", "/v1/models", headers=auth)[0] == 200
        code, reply, _ = request(port, body=body, headers=auth)
        assert code == 200 and reply["choices"][0]["message"]["content"] == chat.chat([MSG], max_tokens=2)[0]
        # saescope's own client sends $SAESCOPE_LLM_TOKEN
        os.environ[TOKEN_ENV] = "s3cret-token-123"
        try:
            assert OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=0).chat([MSG], max_tokens=2) == \
                [reply["choices"][0]["message"]["content"]]
        finally:
            del os.environ[TOKEN_ENV]


def test_the_command_generates_and_prints_a_token_beyond_loopback(chat, tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    environ.update({"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    folder = save_chat_model(tmp_path / "chat")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "llm-server", "--model", str(folder), "--host", "0.0.0.0",
                             "--port", "0", "--device", "cpu", "--dtype", "float32"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environ, cwd=Path(__file__).resolve().parents[3])
    try:
        note = proc.stderr.readline()  # type: ignore[union-attr]
        assert f"export {TOKEN_ENV}=" in note, note
        token = note.rsplit(f"{TOKEN_ENV}=", 1)[1].split(")")[0]
        assert len(token) >= 32
        line = proc.stdout.readline()  # type: ignore[union-attr]
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert request(port, "GET", "/v1/models")[0] == 401
        assert request(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_host_origin_and_content_type_are_checked(chat):
    body = {"messages": MSG, "max_tokens": 1}
    with served(chat, config=ServerConfig(allow_hosts=("llm.internal",))) as (_, port):
        # a page on a DNS name rebound to 127.0.0.1 sends its own name as Host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
            code, reply, _ = request(port, body=body, headers={"Host": host})
            assert code == 403 and "does not answer to the Host" in reply["error"]["message"], host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "llm.internal", f"LLM.internal:{port}"):
            assert request(port, body=body, headers={"Host": host})[0] == 200, host
        # a browser's cross-origin request says where it comes from
        for origin in ("http://attacker.example", "null", f"http://localhost:{port + 1}"):
            code, reply, _ = request(port, body=body, headers={"Origin": origin})
            assert code == 403 and "cross-origin" in reply["error"]["message"], origin
        assert request(port, body=body, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200  # its own origin
        # a form a page may post without a preflight is not JSON
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
            code, reply, _ = request(port, body=json.dumps(body).encode(), headers={"Content-Type": kind})
            assert code == 415 and "application/json" in reply["error"]["message"], kind
        assert request(port, body=body, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:  # a body too big is not read
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (2 << 20))
            assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 413")


def test_a_prompt_longer_than_the_context_is_a_400(chat):
    assert chat.max_context == 1024
    long = [{"role": "user", "content": "hello world " * 160}]  # about 1,100 tokens
    fits = [{"role": "user", "content": "hello world " * 130}]  # about 900 tokens
    with served(chat) as (_, port):
        for stream in (False, True):
            code, reply, _ = request(port, body={"messages": long, "max_tokens": 4, "stream": stream})
            assert code == 400 and reply["error"]["type"] == "context_length_exceeded", stream
            assert "more than the model's context of 1024 tokens" in reply["error"]["message"]
        code, reply, _ = request(port, body={"messages": long, "max_tokens": 1, "logprobs": True})
        assert code == 400 and "context of 1024" in reply["error"]["message"]
        code, reply, _ = request(port, body={"messages": fits, "max_tokens": 200})  # the prompt fits, the reply not
        assert code == 400 and "200 more were asked for" in reply["error"]["message"]
        assert request(port, body={"messages": fits, "max_tokens": 2})[0] == 200


class WatchedLock:
    """The chat's lock, counting the threads that came to wait for it (so a test can wait for them, not sleep)."""

    def __init__(self):
        self.lock, self.came = threading.Lock(), threading.Condition()
        self.waiting = 0

    def __enter__(self):
        with self.came:
            self.waiting += 1
            self.came.notify_all()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def wait_for(self, n: int) -> bool:
        with self.came:
            return self.came.wait_for(lambda: self.waiting >= n, timeout=30)


def test_requests_beyond_the_cap_get_503_at_once(chat, monkeypatch):
    lock = WatchedLock()
    monkeypatch.setattr(chat, "_lock", lock)
    with served(chat, config=ServerConfig(max_requests=2)) as (_, port):
        lock.lock.acquire()  # the model is busy: two requests wait for it
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(request(port, body={"messages": MSG, "max_tokens": 1})[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        try:
            assert lock.wait_for(2), "the two requests never reached the model"
            started = time.perf_counter()
            code, reply, headers = request(port, body={"messages": MSG, "max_tokens": 1})
            assert code == 503 and "busy" in reply["error"]["message"] and headers["Retry-After"] == "1"
            assert time.perf_counter() - started < 5  # refused, not queued
            assert request(port, "GET", "/v1/models")[0] == 200  # the cap is on chat requests
        finally:
            lock.lock.release()
        for t in threads:
            t.join(30)
        assert results == [200, 200]
        assert request(port, body={"messages": MSG, "max_tokens": 1})[0] == 200  # the slots were given back


class FloodingChat:
    """Streams 64 KiB pieces for as long as it is read, holding a lock as ``LocalChat.stream`` holds the model."""

    def __init__(self):
        self.lock, self.closed = threading.Lock(), threading.Event()

    def stream(self, messages, max_tokens=48, temperature=0.0):
        with self.lock:
            try:
                while True:
                    yield "x" * 65536
            finally:
                self.closed.set()


def test_a_client_that_stops_reading_a_stream_does_not_hold_the_model():
    chat = FloodingChat()
    with served(chat, config=ServerConfig(timeout=0.5)) as (_, port):  # type: ignore[arg-type]
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        body = json.dumps({"messages": MSG, "stream": True}).encode()
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:  # ... and reads nothing: the server's writes block, then time out
            assert chat.closed.wait(30), "the generation went on for a client that stopped reading"
            assert chat.lock.acquire(timeout=30), "the model stayed locked"
            chat.lock.release()
        finally:
            client.close()


def test_a_slow_or_idle_connection_is_dropped_after_the_timeout(chat):
    with served(chat, config=ServerConfig(timeout=0.5)) as (_, port):
        for partial in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"messages\""):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(partial)
                conn.settimeout(30)
                started = time.perf_counter()
                assert conn.recv(1024) == b"", "the server answered a request it never fully got"
                assert time.perf_counter() - started < 10  # closed by the server's timeout, not the test's
