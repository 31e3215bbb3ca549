"""Chat backends for explainers and scorers: a local Hugging Face chat model, or any OpenAI-compatible endpoint.

Both answer two calls on a batch of conversations (lists of ``{"role", "content"}`` messages):

* ``chat(conversations, max_tokens)``: one reply each (greedy unless a temperature is given);
* ``yes_probability(conversations)``: the probability of ``1`` against ``0`` as the first token of the reply,
  ``P(1) / (P(0) + P(1))`` as delphi reads its classifier scorers, from the logits (local) or from the
  endpoint's ``top_logprobs`` (falling back to the answer's text where an endpoint gives no log-probabilities).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

Messages = list[dict[str, str]]
KEY_ENV = "SAESCOPE_EXPLAINER_KEY"
"""Environment variable holding the endpoint's API key (``OPENAI_API_KEY`` is read when it is unset)."""


class EndpointError(RuntimeError):
    """The endpoint could not be reached or kept failing after retries."""


class ChatBackend(Protocol):
    name: str

    def chat(self, conversations: list[Messages], max_tokens: int = 48, temperature: float = 0.0) -> list[str]: ...

    def yes_probability(self, conversations: list[Messages]) -> list[float]: ...


def _digit_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids that spell ``1`` and ``0`` as a reply's first token (with and without a leading space)."""
    ones, zeros = set(), set()
    for text, bucket in (("1", ones), (" 1", ones), ("0", zeros), (" 0", zeros)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            bucket.add(ids[0])
    if not ones or not zeros:
        raise ValueError("the scorer model's tokenizer has no single token for the digits 0 and 1")
    return sorted(ones), sorted(zeros)


class LocalChat:
    """A Hugging Face chat model run in this process (CPU or GPU), batched; ``spec`` is a directory, a hub id or
    ``demo`` (the embedded SmolLM2-135M-Instruct). One lock serialises calls, so threads may share it."""

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        from ..model.loading import load_model

        path = spec
        if spec == "demo":
            from ..tools.demo import ensure_demo_model

            path = str(ensure_demo_model())
        self.lm = load_model(path, device=device, dtype=dtype)
        self.name = f"local:{spec if spec == 'demo' else Path(spec).name or spec}"
        self.tokenizer = self.lm.tokenizer
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{spec} has no chat template: an explainer needs a chat (instruct) model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.ones, self.zeros = _digit_ids(self.tokenizer)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _encode(self, conversations: list[Messages]) -> dict[str, torch.Tensor]:
        texts = [str(self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return {k: v.to(self.lm.device) for k, v in enc.items()}

    @torch.inference_mode()
    def chat(self, conversations: list[Messages], max_tokens: int = 48, temperature: float = 0.0) -> list[str]:
        out: list[str] = []
        with self._lock:
            for i in range(0, len(conversations), self.batch_size):
                enc = self._encode(conversations[i : i + self.batch_size])
                sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
                generate = self.lm.hf_model.generate  # pyright: ignore[reportAttributeAccessIssue]
                gen = generate(**enc, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,  # pyright: ignore[reportCallIssue]  (GenerationMixin.generate is typed through a decorator pyright cannot follow)
                               top_p=None, top_k=None, **sampling)
                new = gen[:, enc["input_ids"].shape[1] :]
                out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    @torch.inference_mode()
    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        out: list[float] = []
        with self._lock:
            for i in range(0, len(conversations), self.batch_size):
                enc = self._encode(conversations[i : i + self.batch_size])
                logits = self.lm.model(**enc).logits[:, -1].float()
                probs = logits.softmax(-1)
                p1, p0 = probs[:, self.ones].sum(-1), probs[:, self.zeros].sum(-1)
                out.extend((p1 / (p0 + p1).clamp_min(1e-30)).tolist())
        return out


class OpenAIChat:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, Ollama, OpenAI, ``saescope
    llm-server``): bounded concurrency, retries with exponential backoff on connection errors, 429 and 5xx,
    and a timeout per request. The key comes from ``$SAESCOPE_EXPLAINER_KEY`` or ``$OPENAI_API_KEY``."""

    def __init__(self, base_url: str, model: str, *, concurrency: int = 4, retries: int = 4, timeout: float = 60.0,
                 backoff: float = 0.5, api_key: str | None = None):
        if not model:
            raise ValueError("an OpenAI-compatible explainer needs --explainer-model NAME (the served model's name)")
        self.base_url = base_url.rstrip("/")
        self.model, self.concurrency, self.retries, self.timeout, self.backoff = model, concurrency, retries, timeout, backoff
        self.api_key = api_key if api_key is not None else os.environ.get(KEY_ENV) or os.environ.get("OPENAI_API_KEY")
        self.name = f"openai:{model}@{self.base_url}"

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                body = err.read()[:300].decode(errors="replace")
                last = f"HTTP {err.code}: {body}"
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise EndpointError(f"{url} refused the request ({last})") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                last = f"invalid JSON in the reply: {err}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise EndpointError(f"{url} failed after {self.retries + 1} attempts: {last}")

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    def chat(self, conversations: list[Messages], max_tokens: int = 48, temperature: float = 0.0) -> list[str]:
        def one(messages: Messages) -> str:
            reply = self._post({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature})
            try:
                return reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as err:
                raise EndpointError(f"{self.base_url} answered without choices[0].message.content: {str(reply)[:200]}") from err

        return self._map(one, conversations)

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        def one(messages: Messages) -> float:
            reply = self._post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                                "logprobs": True, "top_logprobs": 10})
            try:
                choice = reply["choices"][0]
            except (KeyError, IndexError, TypeError) as err:
                raise EndpointError(f"{self.base_url} answered without choices: {str(reply)[:200]}") from err
            return _yes_from_choice(choice)

        return self._map(one, conversations)


def _yes_from_choice(choice: dict) -> float:
    """``P(1) / (P(0) + P(1))`` from the first token's ``top_logprobs``; the answer's text where there are none."""
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content:
        p = {"1": 0.0, "0": 0.0}
        for item in content[0].get("top_logprobs") or []:
            tok = str(item.get("token", "")).strip()
            if tok in p:
                p[tok] += math.exp(float(item.get("logprob", -math.inf)))
        if p["1"] + p["0"] > 0:
            return p["1"] / (p["1"] + p["0"])
    text = str((choice.get("message") or {}).get("content") or "").strip()
    return 1.0 if text.startswith("1") else 0.0 if text.startswith("0") else 0.5


def make_backend(spec: str, *, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 concurrency: int = 4, timeout: float = 60.0, retries: int = 4) -> ChatBackend:
    """``http(s)://host:port/v1`` -> an OpenAI-compatible endpoint (``model`` names the served model); anything
    else -> a local Hugging Face chat model (a directory, a hub id, or ``demo``)."""
    if spec.startswith(("http://", "https://")):
        return OpenAIChat(spec, model or "", concurrency=concurrency, timeout=timeout, retries=retries)
    return LocalChat(spec, device=device, dtype=dtype)
