"""Chat backends for explainers and scorers: a local Hugging Face chat model, or any OpenAI-compatible endpoint.

Both answer two calls on a batch of conversations (lists of ``{"role", "content"}`` messages), and stream one:

* ``chat(conversations, max_tokens)``: one reply each (greedy unless a temperature is given);
* ``stream(messages, max_tokens)``: one conversation's reply as text pieces while it is generated, whose
  concatenation is what ``chat([messages])[0]`` answers (greedy);
* ``judge(conversations, options, budget)``: the answer to a question whose answer is one digit among ``options``
  (``judge.Judgement``): the options' probabilities at the reply's first token when that token is an option, from
  the logits (local) or the endpoint's ``top_logprobs``, with their total mass; else, given a token budget, the
  final answer of a longer reply (reasoning models); else a failed judgement (``engine.interp.judge``);
* ``yes_probability(conversations)``: ``P(1) / (P(0) + P(1))`` of yes/no questions (``judge`` without a budget;
  NaN where the judgement failed).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import settings
from . import judge as judging
from .judge import YES_NO, Judgement

Messages = list[dict[str, str]]
KEY_ENV = settings.EXPLAINER_KEY.name
"""Environment variable holding the explainer endpoint's API key, sent to whatever endpoint ``--explainer`` names."""
TOKEN_ENV = settings.LLM_TOKEN.name
"""The bearer token of ``saescope llm-server`` (it requires it when set); a client sends it when ``KEY_ENV`` is unset."""
OPENAI_HOST = "api.openai.com"
"""``$OPENAI_API_KEY`` is sent only here (over https): a key meant for OpenAI never goes to another --explainer URL."""
ALLOW_HTTP_ENV = settings.EXPLAINER_ALLOW_HTTP.name
"""Set to 1 to send an API key over plain http to a host that is not loopback (e.g. inside a trusted network)."""


class EndpointError(RuntimeError):
    """The endpoint could not be reached or kept failing after retries."""


class PromptTooLong(ValueError):
    """A prompt (with the tokens asked for) does not fit the model's context."""


def is_loopback(host: str) -> bool:
    """``localhost`` (or a name under it) or a loopback address: traffic that never leaves this machine."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatBackend(Protocol):
    name: str

    def chat(self, conversations: list[Messages], max_tokens: int = 48, temperature: float = 0.0) -> list[str]: ...

    def stream(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0) -> Iterator[str]: ...

    def judge(self, conversations: list[Messages], options: tuple[str, ...] = YES_NO, budget: int = 0
              ) -> list[Judgement]: ...


class SentenceEmbedder(Protocol):
    """What the embedding scorer and search by meaning need: unit-length vectors for texts (``embed.Embedder``, or
    any model wrapped this way)."""

    name: str
    """Recorded with each stored embedding: vectors of different models are never compared."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _option_ids(tokenizer, options: tuple[str, ...]) -> list[list[int]]:
    """Per option, the token ids that spell it as a reply's first token (with and without a leading space)."""
    out = []
    for option in options:
        ids = {enc[0] for text in (option, " " + option)
               if len(enc := tokenizer.encode(text, add_special_tokens=False)) == 1}
        if not ids:
            raise ValueError(f"the scorer model's tokenizer has no single token for the answer {option!r}")
        out.append(sorted(ids))
    return out


def yes_probabilities(judgements: list[Judgement]) -> list[float]:
    """``P(1) / (P(0) + P(1))`` of each yes/no judgement, NaN where it failed."""
    return [math.nan if (p := j.yes()) is None else p for j in judgements]


class _Stop:
    """A stopping criterion that ends generation once ``event`` is set (a stream's consumer went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class LocalChat:
    """A Hugging Face chat model run in this process (CPU or GPU), batched; ``spec`` is a directory, a hub id or
    ``demo`` (the embedded SmolLM2-135M-Instruct). One lock serialises calls, so threads may share it."""

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        from ..model.loading import load_model

        path = spec
        if spec == "demo":
            from ..model.demo import ensure_demo_model

            path = str(ensure_demo_model())
        self.lm = load_model(path, device=device, dtype=dtype)
        self.name = f"local:{spec if spec == 'demo' else Path(spec).name or spec}"
        self.tokenizer = self.lm.tokenizer
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{spec} has no chat template: an explainer needs a chat (instruct) model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._options: dict[tuple[str, ...], list[list[int]]] = {YES_NO: _option_ids(self.tokenizer, YES_NO)}
        self.batch_size = batch_size
        self.max_context = self.lm.max_context
        self._lock = threading.Lock()

    def _encode(self, conversations: list[Messages], reserve: int = 0) -> dict[str, torch.Tensor]:
        """The conversations' prompts, left-padded; a ``PromptTooLong`` when the longest with ``reserve`` more tokens
        (the reply) exceeds the model's context (past it a model writes noise, or fails)."""
        texts = [str(self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        n = enc["input_ids"].shape[1]
        if n + reserve > self.max_context:
            raise PromptTooLong(f"the prompt is {n} tokens{f' and {reserve} more were asked for' if reserve else ''}: "
                                f"more than the model's context of {self.max_context} tokens")
        return {k: v.to(self.lm.device) for k, v in enc.items()}

    def _generate(self, enc: dict[str, torch.Tensor], max_tokens: int, temperature: float, **extra) -> torch.Tensor:
        """``generate`` with the settings ``chat`` and ``stream`` share (so a stream is the chat answer, piece by piece)."""
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        generate = self.lm.hf_model.generate  # pyright: ignore[reportAttributeAccessIssue]
        return generate(**enc, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,  # pyright: ignore[reportCallIssue]  (GenerationMixin.generate is typed through a decorator pyright cannot follow)
                        top_p=None, top_k=None, **sampling, **extra)

    @torch.inference_mode()
    def chat(self, conversations: list[Messages], max_tokens: int = 48, temperature: float = 0.0) -> list[str]:
        out: list[str] = []
        with self._lock:
            for i in range(0, len(conversations), self.batch_size):
                enc = self._encode(conversations[i : i + self.batch_size], reserve=max_tokens)
                gen = self._generate(enc, max_tokens, temperature)
                new = gen[:, enc["input_ids"].shape[1] :]
                out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def stream(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0) -> Iterator[str]:
        """The reply as it is generated (whole words where the tokenizer allows), ``generate`` running in a worker
        thread; the backend's lock is held until the generation ends. Closing the iterator early stops the
        generation at the next token; an exception in the worker is raised here."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        with self._lock:
            enc = self._encode([messages], reserve=max_tokens)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)  # pyright: ignore[reportArgumentType]
            stop = threading.Event()
            failed: list[BaseException] = []

            def work() -> None:
                try:
                    with torch.inference_mode():
                        self._generate(enc, max_tokens, temperature, streamer=streamer,
                                       stopping_criteria=StoppingCriteriaList([_Stop(stop)]))
                except BaseException as err:  # re-raised in the consumer's thread
                    failed.append(err)
                    streamer.on_finalized_text("", stream_end=True)

            worker = threading.Thread(target=work, name="saescope-stream", daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                stop.set()
                worker.join()
            if failed:
                raise failed[0]

    @torch.inference_mode()
    def judge(self, conversations: list[Messages], options: tuple[str, ...] = YES_NO, budget: int = 0) -> list[Judgement]:
        """The answer to each digit question (``engine.interp.judge``): the options' probabilities at the first
        position when the greedy first token is an option, else (with ``budget`` tokens) the parsed final answer."""
        if options not in self._options:
            self._options[options] = _option_ids(self.tokenizer, options)
        ids = self._options[options]
        out: list[Judgement] = []
        with self._lock:
            for i in range(0, len(conversations), self.batch_size):
                enc = self._encode(conversations[i : i + self.batch_size])
                probs = self.lm.model(**enc).logits[:, -1].float().softmax(-1)
                masses = torch.stack([probs[:, o].sum(-1) for o in ids], 1).tolist()
                top = probs.argmax(-1).tolist()
                for m, t in zip(masses, top, strict=True):
                    first = str(self.tokenizer.decode([t]))
                    out.append(judging.from_option_mass(m, first) if judging.is_option(first, options)
                               else Judgement(None, float(sum(m)), first))
            redo = [k for k, j in enumerate(out) if j.failed] if budget > 0 else []
            for i in range(0, len(redo), self.batch_size):
                chunk = redo[i : i + self.batch_size]
                enc = self._encode([conversations[k] for k in chunk], reserve=budget)
                gen = self._generate(enc, budget, 0.0)[:, enc["input_ids"].shape[1] :]
                for k, text in zip(chunk, self.tokenizer.batch_decode(gen, skip_special_tokens=True), strict=True):
                    out[k] = judging.parsed(text, options, out[k].mass)
        return out

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        return yes_probabilities(self.judge(conversations))


def endpoint_key(url: str) -> str | None:
    """The API key for endpoint ``url`` from the environment: ``$SAESCOPE_EXPLAINER_KEY``, else ``llm-server``'s
    ``$SAESCOPE_LLM_TOKEN``, else ``$OPENAI_API_KEY`` only when ``url`` is OpenAI's own (https) API."""
    parts = urllib.parse.urlsplit(url)
    openai = parts.scheme == "https" and (parts.hostname or "").lower() == OPENAI_HOST
    return (settings.get(settings.EXPLAINER_KEY) or settings.get(settings.LLM_TOKEN)
            or (os.environ.get("OPENAI_API_KEY") if openai else None) or None)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """An endpoint's redirect is an error: urllib would send the request's headers, the API key among them, to
    wherever the redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise EndpointError(f"{req.full_url} redirected (HTTP {code}) to {newurl}: saescope does not follow an "
                            "endpoint's redirects (its API key would go along); give the final URL as --explainer")


class OpenAIChat:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, Ollama, OpenAI, ``saescope
    llm-server``): bounded concurrency, retries with exponential backoff on connection errors, 429 and 5xx,
    and a timeout per request.

    The key (``endpoint_key``) goes only to ``base_url``: a redirect is an ``EndpointError``, and a key is not sent
    over plain http to a host other than loopback unless ``allow_http`` (default: ``$SAESCOPE_EXPLAINER_ALLOW_HTTP``
    is 1)."""

    def __init__(self, base_url: str, model: str, *, concurrency: int = 4, retries: int = 4, timeout: float = 60.0,
                 backoff: float = 0.5, api_key: str | None = None, allow_http: bool | None = None):
        if not model:
            raise ValueError("an OpenAI-compatible explainer needs --explainer-model NAME (the served model's name)")
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an endpoint is http(s)://HOST[:PORT]/PATH, got {base_url!r}")
        self.model, self.concurrency, self.retries, self.timeout, self.backoff = model, concurrency, retries, timeout, backoff
        self.api_key = api_key if api_key is not None else endpoint_key(self.base_url)
        if allow_http is None:
            allow_http = settings.get(settings.EXPLAINER_ALLOW_HTTP, False)
        if self.api_key and parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_http:
            raise ValueError(f"refusing to send an API key in clear text to {self.base_url} (plain http to a host that "
                             f"is not this machine): use https, or set {ALLOW_HTTP_ENV}=1 where the network is trusted")
        self._open = urllib.request.build_opener(_RefuseRedirects).open
        self.name = f"openai:{model}@{self.base_url}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _request(self, payload: dict) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")

    def _post(self, payload: dict) -> dict:
        url = self.url
        last = ""
        for attempt in range(self.retries + 1):
            try:
                with self._open(self._request(payload), timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                last = _refused_or_transient(url, err)
            except _NETWORK as err:
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

    def stream(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0) -> Iterator[str]:
        """The reply as the endpoint sends it (``"stream": true``, server-sent events). Connection errors, 429 and 5xx
        are retried with backoff until the first piece has arrived; after that, a broken or stalled stream (no byte
        for ``timeout`` seconds) is an ``EndpointError``, as are HTTP errors and malformed events."""
        url = self.url
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                   "stream": True}
        last = ""
        for attempt in range(self.retries + 1):
            started = False
            try:
                with self._open(self._request(payload), timeout=self.timeout) as resp:
                    for piece in _sse_pieces(resp, url):
                        started = True
                        yield piece
                return
            except urllib.error.HTTPError as err:
                last = _refused_or_transient(url, err)
            except _NETWORK as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                if started:
                    raise EndpointError(f"{url} broke off the stream: {last}") from err
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise EndpointError(f"{url} failed after {self.retries + 1} attempts: {last}")

    def judge(self, conversations: list[Messages], options: tuple[str, ...] = YES_NO, budget: int = 0) -> list[Judgement]:
        """The answer to each digit question (``engine.interp.judge``): one token with ``top_logprobs``; when that
        token is not an option and ``budget`` > 0, a second request of up to ``budget`` tokens whose final answer
        is parsed."""
        def one(messages: Messages) -> Judgement:
            reply = self._post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                                "logprobs": True, "top_logprobs": 10})
            first = _judgement(self.base_url, reply, options)
            if not first.failed or budget <= 0:
                return first
            again = self._post({"model": self.model, "messages": messages, "max_tokens": budget, "temperature": 0.0})
            return judging.parsed(_content(self.base_url, again), options, first.mass)

        return self._map(one, conversations)

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        return yes_probabilities(self.judge(conversations))


_NETWORK = (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException)
"""What a request that may succeed when tried again raises (a stalled read raises TimeoutError)."""


def _refused_or_transient(url: str, err: urllib.error.HTTPError) -> str:
    """The HTTP error as text when a retry may help (408, 409, 429, 5xx); an ``EndpointError`` otherwise."""
    last = f"HTTP {err.code}: {err.read()[:300].decode(errors='replace')}"
    if err.code not in (408, 409, 429) and err.code < 500:
        raise EndpointError(f"{url} refused the request ({last})") from err
    return last


def _sse_pieces(resp, url: str) -> Iterator[str]:
    """``choices[0].delta.content`` of each ``data: {...}`` event of a chat-completions stream, until ``data: [DONE]``.

    A stream that ends before ``[DONE]`` (and before a chunk with a ``finish_reason``) raises ``ConnectionError``,
    which the caller retries while nothing has been yielded yet. A server that ignores ``"stream"`` and answers
    one JSON completion gives its content as one piece."""
    if resp.headers.get("Content-Type", "").startswith("application/json"):
        try:
            content = json.loads(resp.read())["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise EndpointError(f"{url} answered a stream request without choices[0].message.content") from err
        if content:
            yield content
        return
    data: list[str] = []
    finished = False
    for raw in resp:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            continue  # comments (": keep-alive"), event:, id:, retry: lines
        if not data:
            continue
        event, data = "\n".join(data), []
        if event.strip() == "[DONE]":
            return
        content, done = _delta(event, url)
        finished = finished or done
        if content:
            yield content
    if finished:  # some servers close after the last chunk without [DONE]
        return
    raise ConnectionError("the stream ended before data: [DONE]")


def _delta(event: str, url: str) -> tuple[str, bool]:
    """(content, finished) of one ``chat.completion.chunk`` event; an ``EndpointError`` for an error or junk."""
    try:
        chunk = json.loads(event)
    except ValueError as err:
        raise EndpointError(f"{url} sent a malformed event: {event[:200]!r}") from err
    if not isinstance(chunk, dict):
        raise EndpointError(f"{url} sent a malformed event: {event[:200]!r}")
    if chunk.get("error"):
        error = chunk["error"]
        raise EndpointError(f"{url} failed mid-stream: {error.get('message', error) if isinstance(error, dict) else error}")
    choices = chunk.get("choices")
    if choices == []:  # e.g. a final usage-only chunk
        return "", False
    try:
        choice = choices[0]  # pyright: ignore[reportOptionalSubscript]
        content = choice["delta"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise EndpointError(f"{url} sent an event without choices[0].delta: {event[:200]!r}") from err
    if not isinstance(content, str):
        raise EndpointError(f"{url} sent a non-text delta: {event[:200]!r}")
    return content, bool(choice.get("finish_reason"))


def _content(url: str, reply: dict) -> str:
    try:
        return str(reply["choices"][0]["message"].get("content") or "")
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise EndpointError(f"{url} answered without choices[0].message: {str(reply)[:200]}") from err


def _judgement(url: str, reply: dict, options: tuple[str, ...]) -> Judgement:
    """A one-token reply read as ``engine.interp.judge`` says: the options' ``top_logprobs`` when its token is an
    option; without log-probabilities, its text when that is exactly an option (mass unknown); else failed."""
    text = _content(url, reply)
    content = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
    if content:
        token = str(content[0].get("token", text))
        masses, total = judging.from_top_logprobs(content[0].get("top_logprobs") or [], options)
        if judging.is_option(token, options):
            return judging.from_option_mass(masses, token)
        return Judgement(None, total, token)
    if judging.is_option(text, options):
        k = options.index(text.strip())
        return Judgement(tuple(1.0 if i == k else 0.0 for i in range(len(options))), None, text)
    return Judgement(None, None, text)


def make_backend(spec: str, *, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 concurrency: int = 4, timeout: float = 60.0, retries: int = 4) -> ChatBackend:
    """``http(s)://host:port/v1`` -> an OpenAI-compatible endpoint (``model`` names the served model); anything
    else -> a local Hugging Face chat model (a directory, a hub id, or ``demo``)."""
    if spec.startswith(("http://", "https://")):
        return OpenAIChat(spec, model or "", concurrency=concurrency, timeout=timeout, retries=retries)
    return LocalChat(spec, device=device, dtype=dtype)
