"""Helpers for the HTTP tests of engine.interp (the llm-server, the OpenAI-compatible client, explain over HTTP):
local ports, a JSON POST, copies of the shared run, explainer prompts. No network: everything is on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from engine.interp import prompts

SERVED = "tiny-chat"
FAST = {"retries": 2, "backoff": 0.01}
CONV = [{"role": "user", "content": "hello"}]


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


def explain_prompts(n: int) -> list[list[dict[str, str]]]:
    """Explainer prompts that differ (so do the tiny model's replies)."""
    words = ["fox", "light", "word", "model", "numpy", "God", "bold", "quick"]
    return [prompts.explain_messages([f"the<< {words[i % 8]}>> was {i}", f"and<< {words[(i + 3) % 8]}>> here"],
                                     [words[i % 8]]) for i in range(n)]
