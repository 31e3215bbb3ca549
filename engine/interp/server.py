"""``saescope llm-server``: a local chat model behind an OpenAI-compatible HTTP API (``/v1/chat/completions`` with
``logprobs``/``top_logprobs`` and ``"stream": true``, ``/v1/models``), so any client of that protocol (saescope's
own explainer, or another tool) can use it. Standard library HTTP server, one thread per request; the model
serialises calls.

A streamed reply is ``text/event-stream`` (chunked): ``data: {chat.completion.chunk}`` events, the role first, then
one per text piece as the model writes it, then one with ``finish_reason``, then ``data: [DONE]``; each is flushed
as it is written. A model that fails before its first piece answers 500 as a plain request does; one that fails
later sends ``data: {"error": ...}`` and ends the stream without ``[DONE]``.

Guards (``ServerConfig``), checked before any work: the ``Host`` header must name this machine (a loopback name, an IP
address, the bound host or an allowed name), so a web page cannot reach the server through a DNS name rebound to
127.0.0.1; a browser's cross-origin request (an ``Origin`` other than the server's own) is refused; with a token, every
request needs ``Authorization: Bearer TOKEN`` (a host other than loopback needs a token); a POST body must be
``application/json`` (no form a page could send without asking); at most ``max_requests`` chat requests are taken at
once (503 beyond); a prompt longer than the model's context is a 400. Every socket read and write times out, so a
client that stops reading a stream loses its connection and the generation stops, freeing the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .backends import LocalChat, PromptTooLong, is_loopback

MAX_BODY = 1 << 20
"""Bytes of a request body: the cap on a prompt's length before it is tokenized."""


@dataclass(frozen=True)
class ServerConfig:
    """How ``llm-server`` guards its model."""

    token: str | None = None
    """Bearer token every request must carry (``Authorization: Bearer TOKEN``); required on a host other than loopback."""
    max_requests: int = 4
    """Chat requests taken at once (one generates, the others wait for the model); more are answered 503."""
    timeout: float = 30.0
    """Seconds a socket read or write may block: an idle connection, a slow body, or a client that stops reading a
    stream is dropped after this (and its generation stopped)."""
    allow_hosts: tuple[str, ...] = ()
    """Host names clients may call the server by, besides loopback names, IP addresses and the bound host."""

    def __post_init__(self):
        if self.token is not None and (not self.token or not self.token.isascii() or not self.token.isprintable()
                                       or any(c.isspace() for c in self.token)):
            raise ValueError("the token must be non-empty printable ASCII without spaces (it travels in a header)")
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


def new_token() -> str:
    """A random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def _error(handler: BaseHTTPRequestHandler, code: int, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if code >= 400:  # the request's body may be unread: this connection carries nothing more
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


def _host_name(value: str) -> str:
    """The name in a ``Host`` header (or an origin's netloc) without its port, lower case, IPv6 without brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _top_logprobs(chat: LocalChat, messages: list[dict], n: int) -> tuple[str, list[dict]]:
    """The greedy first token of the reply and the ``n`` most likely first tokens with their log-probabilities."""
    with chat._lock, torch.inference_mode():
        enc = chat._encode([messages])
        logp = chat.lm.model(**enc).logits[0, -1].float().log_softmax(-1)
    values, ids = logp.topk(max(1, n))
    tokens = [str(chat.tokenizer.decode([int(i)])) for i in ids]
    top = [{"token": t, "logprob": float(v), "bytes": list(t.encode())} for t, v in zip(tokens, values.tolist(), strict=True)]
    return tokens[0], top


class _ClientGone(Exception):
    """The client closed the connection while a reply was being streamed."""


def make_handler(chat: LocalChat, served_name: str, config: ServerConfig | None = None, bound_host: str = "127.0.0.1"):
    """The request handler class serving ``chat`` as ``served_name`` under ``config``, for a server bound to
    ``bound_host``."""
    config = config or ServerConfig()
    hosts = {"localhost", *(h.lower() for h in config.allow_hosts)}
    if bound_host and not _is_ip(_host_name(bound_host)):
        hosts.add(bound_host.lower())
    slots = threading.BoundedSemaphore(config.max_requests)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = config.timeout  # on the socket (StreamRequestHandler): every read and write

        def log_message(self, format, *args):
            pass

        def _allowed(self) -> bool:
            """The guards every request passes (Host, Origin, token); answers the refusal and returns False."""
            host = self.headers.get("Host")
            name = _host_name(host or "")
            if not host or not (name in hosts or name.endswith(".localhost") or _is_ip(name)):
                _error(self, 403, f"this server does not answer to the Host {host!r}: call it by a loopback name, an IP "
                       "address or its bound host (llm-server --allow-host NAME adds a name)", "permission_error")
                return False
            origin = self.headers.get("Origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != host.strip().lower():
                _error(self, 403, f"cross-origin requests (Origin {origin!r}) are refused", "permission_error")
                return False
            if config.token is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), f"Bearer {config.token}".encode()):
                _error(self, 401, "this server needs the header Authorization: Bearer TOKEN (llm-server's token; "
                       "saescope clients send $SAESCOPE_LLM_TOKEN)", "authentication_error",
                       {"WWW-Authenticate": 'Bearer realm="saescope llm-server"'})
                return False
            return True

        def _json(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if not self._allowed():
                return
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._json({"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "saescope"}]})
            else:
                _error(self, 404, f"no route {self.path}")

        def do_POST(self):
            if not self._allowed():
                return
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                _error(self, 404, f"no route {self.path}")
                return
            kind = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                _error(self, 415, f"the request body must be Content-Type: application/json, got {kind or 'none'!r}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length <= 0 or length > MAX_BODY:
                code = 413 if length > MAX_BODY else 400
                _error(self, code, f"request body must be 1 byte to {MAX_BODY} bytes, got {length}")
                return
            if not slots.acquire(blocking=False):
                _error(self, 503, f"the server is busy ({config.max_requests} requests in progress): retry later",
                       "server_error", {"Retry-After": "1"})
                return
            try:
                self._chat(length)
            finally:
                slots.release()

        def _chat(self, length: int) -> None:
            try:
                body = self.rfile.read(length)
            except OSError:  # a body slower than the timeout, or a client gone: nobody to answer
                self.close_connection = True
                return
            try:
                req = json.loads(body)
                messages = req["messages"]
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "content" in m
                                                                             for m in messages):
                    raise ValueError("messages must be a non-empty list of {role, content} objects")
                max_tokens = req.get("max_tokens", req.get("max_completion_tokens"))
                max_tokens = 64 if max_tokens is None else int(max_tokens)  # not `or 64`: 0 is refused, not 64
                if not 1 <= max_tokens <= 1024:
                    raise ValueError(f"max_tokens must be 1..1024, got {max_tokens}")
                temperature = float(req.get("temperature") or 0.0)
                n_top = int(req.get("top_logprobs") or 5)
                if not 0 <= n_top <= 20:
                    raise ValueError(f"top_logprobs must be 0..20, got {n_top}")
            except (ValueError, KeyError, TypeError) as err:
                _error(self, 400, f"bad request: {err}")
                return
            if req.get("stream"):
                if req.get("logprobs") and max_tokens == 1:
                    try:
                        first, top = _top_logprobs(chat, messages, n_top)
                    except Exception as err:
                        self._failed(err)
                        return
                    logprobs = {"content": [{"token": first, "logprob": top[0]["logprob"], "bytes": top[0]["bytes"],
                                             "top_logprobs": top}]}
                    self._stream(iter([first]), "length", logprobs)
                else:
                    self._stream(chat.stream(messages, max_tokens=max_tokens, temperature=temperature), "stop")
                return
            choice: dict = {"index": 0, "finish_reason": "stop"}
            try:  # a failing model answers 500 with the reason instead of dropping the connection
                if req.get("logprobs") and max_tokens == 1:
                    first, top = _top_logprobs(chat, messages, n_top)
                    choice["message"] = {"role": "assistant", "content": first}
                    choice["logprobs"] = {"content": [{"token": first, "logprob": top[0]["logprob"], "bytes": top[0]["bytes"],
                                                       "top_logprobs": top}]}
                    choice["finish_reason"] = "length"
                else:
                    text = chat.chat([messages], max_tokens=max_tokens, temperature=temperature)[0]
                    choice["message"] = {"role": "assistant", "content": text}
            except Exception as err:
                self._failed(err)
                return
            self._json({"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                        "model": served_name, "choices": [choice]})

        def _failed(self, err: Exception) -> None:
            """A model call that raised: 400 for a prompt past the model's context, else 500 with the reason."""
            if isinstance(err, PromptTooLong):
                _error(self, 400, f"bad request: {err}", "context_length_exceeded")
            else:
                _error(self, 500, f"the model failed: {type(err).__name__}: {err}", "server_error")

        def _event(self, payload: dict | str) -> None:
            """One server-sent event as one HTTP chunk, flushed."""
            data = payload if isinstance(payload, str) else json.dumps(payload)
            event = f"data: {data}\n\n".encode()
            try:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            except OSError as err:
                raise _ClientGone from err

        def _stream(self, pieces: Iterator[str], finish_reason: str, logprobs: dict | None = None) -> None:
            ident, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

            def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **(extra or {})}
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served_name,
                        "choices": [choice]}

            try:
                try:  # the first piece before the headers: a model that fails at once answers 500, as without stream
                    pending = next(pieces, None)
                except Exception as err:
                    self._failed(err)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._event(chunk({"role": "assistant", "content": ""}))
                try:
                    while pending is not None:
                        self._event(chunk({"content": pending}, extra={"logprobs": logprobs} if logprobs else None))
                        logprobs = None
                        pending = next(pieces, None)
                except _ClientGone:
                    raise
                except Exception as err:  # headers are out: the failure goes in the stream, which ends without [DONE]
                    self._event({"error": {"message": f"the model failed: {type(err).__name__}: {err}",
                                           "type": "server_error", "code": 500}})
                    self.wfile.write(b"0\r\n\r\n")
                    self.close_connection = True
                    return
                self._event(chunk({}, finish_reason))
                self._event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (_ClientGone, OSError):
                self.close_connection = True
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # a client that went away stops the generation and frees the model

    return Handler


def make_server(chat: LocalChat, host: str = "127.0.0.1", port: int = 0, served_name: str = "saescope-local",
                config: ServerConfig | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; refuses a host other than loopback without a token."""
    config = config or ServerConfig()
    if config.token is None and not is_loopback(host):
        raise ValueError(f"llm-server on {host!r} (not loopback) needs a token: anyone who reaches the port could use "
                         "the model; set $SAESCOPE_LLM_TOKEN (or let `saescope llm-server` generate one)")
    server = ThreadingHTTPServer((host, port), make_handler(chat, served_name, config, host))
    server.daemon_threads = True
    return server


def start_server(chat: LocalChat, host: str = "127.0.0.1", port: int = 0, served_name: str = "saescope-local",
                 config: ServerConfig | None = None) -> ThreadingHTTPServer:
    """A running server in a daemon thread; ``server.server_address`` has the port. ``server.shutdown()`` stops it."""
    server = make_server(chat, host, port, served_name, config)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_forever(chat: LocalChat, host: str, port: int, served_name: str, config: ServerConfig | None = None) -> None:
    server = make_server(chat, host, port, served_name, config)
    print(f"saescope llm-server: {served_name} on http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


