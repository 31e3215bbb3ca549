"""An API key goes only where it was meant: not along a redirect (a real server redirecting to a second real server,
which must never see the key), not in clear text to another machine unless allowed, and ``$OPENAI_API_KEY`` only
to OpenAI's API."""

from __future__ import annotations

import json

import pytest

from engine.interp.backends import ALLOW_HTTP_ENV, KEY_ENV, TOKEN_ENV, EndpointError, OpenAIChat, endpoint_key
from tests.engine.interp_util import LocalServer, QuietHandler, completion

CONV = [{"role": "user", "content": "hello"}]
KEY = "sk-do-not-leak-0123456789"


class Recorder(LocalServer):
    """A real HTTP server on 127.0.0.1 that records every request (method, path, headers) and answers each with
    ``respond(handler)`` (default: a chat completion)."""

    def __init__(self, respond=None):
        self.requests: list[dict] = []
        owner = self

        class Handler(QuietHandler):
            def _any(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests.append({"method": self.command, "path": self.path,
                                       "headers": {k.lower(): v for k, v in self.headers.items()}})
                if respond is not None:
                    respond(self)
                    return
                body = json.dumps(completion("from the second server")).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _any

        self.start(Handler)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (KEY_ENV, TOKEN_ENV, "OPENAI_API_KEY", ALLOW_HTTP_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("call", ["chat", "stream"])
def test_a_redirect_never_carries_the_key_elsewhere(clean_env, code, call):
    with Recorder() as elsewhere:
        def redirect(h):
            h.send_response(code)
            h.send_header("Location", elsewhere.url + "/chat/completions")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with Recorder(redirect) as endpoint:
            clean_env.setenv(KEY_ENV, KEY)
            client = OpenAIChat(endpoint.url, "m", retries=2, backoff=0.01)
            with pytest.raises(EndpointError, match=f"redirected \\(HTTP {code}\\) to {elsewhere.url}.*does not follow"):
                client.chat([CONV]) if call == "chat" else list(client.stream(CONV))
            assert [r["headers"].get("authorization") for r in endpoint.requests] == [f"Bearer {KEY}"]  # not retried
        assert elsewhere.requests == [], "the redirect target was contacted"


def test_openai_key_goes_to_openai_only(clean_env):
    clean_env.setenv("OPENAI_API_KEY", KEY)
    with Recorder() as local:
        assert OpenAIChat(local.url, "m").chat([CONV]) == ["from the second server"]
        assert "authorization" not in local.requests[0]["headers"]
    assert endpoint_key("https://api.openai.com/v1") == KEY
    for url in ("http://api.openai.com/v1", "https://api.openai.com.attacker.example/v1", "https://example.com/v1",
                "https://attacker.example/api.openai.com/v1"):
        assert endpoint_key(url) is None, url
    clean_env.setenv(TOKEN_ENV, "llm-token")  # llm-server's token, then the explainer's own key, win everywhere
    assert endpoint_key("https://api.openai.com/v1") == "llm-token"
    clean_env.setenv(KEY_ENV, "explainer-key")
    assert endpoint_key("http://127.0.0.1:8000/v1") == endpoint_key("https://api.openai.com/v1") == "explainer-key"


def test_a_key_is_not_sent_in_clear_text_to_another_machine(clean_env):
    for url in ("http://192.0.2.10:8000/v1", "http://llm.example/v1", "http://0.0.0.0:8000/v1"):
        with pytest.raises(ValueError, match=f"refusing to send an API key in clear text.*{ALLOW_HTTP_ENV}=1"):
            OpenAIChat(url, "m", api_key=KEY)
        clean_env.setenv(KEY_ENV, KEY)
        with pytest.raises(ValueError, match="clear text"):
            OpenAIChat(url, "m")
        clean_env.delenv(KEY_ENV)
        assert OpenAIChat(url, "m").api_key is None  # no key: nothing to leak
        assert OpenAIChat(url, "m", api_key=KEY, allow_http=True).api_key == KEY
        clean_env.setenv(ALLOW_HTTP_ENV, "1")
        assert OpenAIChat(url, "m", api_key=KEY).api_key == KEY
        clean_env.delenv(ALLOW_HTTP_ENV)
    for url in ("https://llm.example/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"):
        assert OpenAIChat(url, "m", api_key=KEY).api_key == KEY, url
    with pytest.raises(ValueError, match="http\\(s\\)://HOST"):
        OpenAIChat("ftp://example.com/v1", "m")
