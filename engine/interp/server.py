"""``saescope llm-server``: a local chat model behind an OpenAI-compatible HTTP API (``/v1/chat/completions`` with
``logprobs``/``top_logprobs`` and ``"stream": true``, ``/v1/models``), so any client of that protocol (saescope's
own explainer, or another tool) can use it. Standard library HTTP server, one thread per request; the model
serialises calls.

A streamed reply is ``text/event-stream`` (chunked): ``data: {chat.completion.chunk}`` events, the role first, then
one per text piece as the model writes it, then one with ``finish_reason``, then ``data: [DONE]``; each is flushed
as it is written. A model that fails before its first piece answers 500 as a plain request does; one that fails
later sends ``data: {"error": ...}`` and ends the stream without ``[DONE]``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .backends import LocalChat

MAX_BODY = 1 << 20


def _error(handler: BaseHTTPRequestHandler, code: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


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


def make_handler(chat: LocalChat, served_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def _json(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._json({"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "saescope"}]})
            else:
                _error(self, 404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                _error(self, 404, f"no route {self.path}")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                _error(self, 400, f"request body must be 1 byte to {MAX_BODY} bytes, got {length}")
                return
            try:
                req = json.loads(self.rfile.read(length))
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
                        _error(self, 500, f"the model failed: {type(err).__name__}: {err}")
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
                _error(self, 500, f"the model failed: {type(err).__name__}: {err}")
                return
            self._json({"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                        "model": served_name, "choices": [choice]})

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
                    _error(self, 500, f"the model failed: {type(err).__name__}: {err}")
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


def start_server(chat: LocalChat, host: str = "127.0.0.1", port: int = 0, served_name: str = "saescope-local"):
    """A running server in a daemon thread; ``server.server_address`` has the port. ``server.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), make_handler(chat, served_name))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_forever(chat: LocalChat, host: str, port: int, served_name: str) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(chat, served_name))
    server.daemon_threads = True
    print(f"saescope llm-server: {served_name} on http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


