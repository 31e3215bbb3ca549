"""The served tiny chat model shared by the HTTP tests of engine.interp (built once for the package)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest

from engine.interp.backends import LocalChat
from engine.interp.server import make_handler
from tests.engine.interp.http_util import SERVED
from tests.engine.interp_util import build_run, save_chat_model, save_embedder


@pytest.fixture(scope="package")
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
