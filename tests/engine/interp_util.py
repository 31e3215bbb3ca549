"""Tiny runs, chat models, embedders and chat backends for the explain (engine.interp) tests: no network."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tests.dashboard.tinyrun import HOOK, write_corpus

DEAD = (5, 77)
"""Latents of the test SAE that never fire (encoder bias far below any pre-activation)."""
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}@{% endif %}"
)


def make_sae(d_in: int = 64, d_sae: int = 256, seed: int = 0):
    """A random TopK SAE whose encoder is its decoder's transpose, with the latents ``DEAD`` never firing."""
    from engine.saes import SAEConfig, build_sae

    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    b_enc = torch.zeros(d_sae)
    b_enc[list(DEAD)] = -1e4
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, hook_name=HOOK, k=8)
    return build_sae(cfg, {"W_dec": W_dec, "b_dec": torch.zeros(d_in), "W_enc": W_dec.T.contiguous(), "b_enc": b_enc})


def build_run(root: Path) -> Path:
    """A finished run of a tiny random llama and the SAE above on a small corpus (context length 32)."""
    from engine.model.loading import load_model
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    root.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(root / "model")
    sae_dir = make_sae().save(root / "sae")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=32)
    lm = load_model(model_dir, device="cpu", dtype="float32")
    run = root / "run"
    precompute(lm, load_sae(sae_dir), corpus, run, context_len=32, sae_path=sae_dir, progress=False)
    return run


def save_chat_model(path: Path, seed: int = 1) -> Path:
    """A tiny random llama with a chat template, shaped so the digits ``1`` and ``0`` are its two likeliest first
    reply tokens (so an endpoint's top log-probabilities hold the whole yes/no mass) while the rest of its
    replies still depend on the prompt.

    The generation prompt ends with ``@``, whose embedding is made long, so the last hidden state points about the
    same way for every prompt; the untied output rows of ``1`` and ``0`` are set along that direction.
    """
    from transformers import AutoModelForCausalLM

    from engine.interp import prompts
    from engine.model.tiny import tiny_config, tiny_tokenizer

    cfg = tiny_config("llama", n_positions=1024)
    cfg.tie_word_embeddings = False
    cfg.initializer_range = 0.1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    (at,), (one,), (zero,) = (tok.encode(s, add_special_tokens=False) for s in ("@", "1", "0"))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[at] = 3.0 * emb[at] / emb[at].norm()
        hidden = []
        for i in range(4):
            ids = tok.apply_chat_template(prompts.detection_messages(f"probe {i}", f"some text {i} here"),
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            hidden.append(model.model(input_ids=ids).last_hidden_state[0, -1])
        h = torch.stack(hidden).mean(0)
        model.lm_head.weight[one] = 6.0 * h / h.norm() ** 2
        model.lm_head.weight[zero] = 5.5 * h / h.norm() ** 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_embedder(path: Path) -> Path:
    """A tiny random BERT sentence encoder folder (word-piece vocabulary of letters and a few words)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789.,:;'\"()<>=+-_",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"), "the", "word", "light", "fox", "model", "def"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(path)
    return path


class ScriptedChat:
    """A chat backend answering from a function of the conversation; counts what it was asked (thread-safe).

    ``answer(user_text) -> str`` writes explanations; yes-probabilities are a stable hash of the question in (0, 1),
    and so is the chosen option of other digit questions (``judge``).
    """

    def __init__(self, answer=None, name: str = "scripted"):
        self.name = name
        self.answer = answer or (lambda text: "words about " + hashlib.sha1(text.encode()).hexdigest()[:6])
        self.chats: list[str] = []
        self.questions: list[str] = []
        self._lock = threading.Lock()

    def chat(self, conversations, max_tokens: int = 48, temperature: float = 0.0) -> list[str]:
        with self._lock:
            self.chats += [c[-1]["content"] for c in conversations]
        return [self.answer(c[-1]["content"]) for c in conversations]

    def yes_probability(self, conversations) -> list[float]:
        with self._lock:
            self.questions += [c[-1]["content"] for c in conversations]
        return [int(hashlib.sha1(c[-1]["content"].encode()).hexdigest()[:8], 16) / 2**32 for c in conversations]

    def judge(self, conversations, options=("0", "1"), budget: int = 0):
        from engine.interp.judge import Judgement

        if tuple(options) == ("0", "1"):
            return [Judgement((1 - p, p), 1.0, "1" if p > 0.5 else "0") for p in self.yes_probability(conversations)]
        with self._lock:
            self.questions += [c[-1]["content"] for c in conversations]
        out = []
        for c in conversations:
            k = int(hashlib.sha1(c[-1]["content"].encode()).hexdigest()[:8], 16) % len(options)
            out.append(Judgement(tuple(float(i == k) for i in range(len(options))), 1.0, options[k]))
        return out


class LocalServer:
    """A real HTTP server on 127.0.0.1, in a thread, serving ``handler`` (a ``BaseHTTPRequestHandler`` class);
    ``url`` is its OpenAI-style base (``http://127.0.0.1:PORT/v1``). The test servers below build on it."""

    def start(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass


class ScriptedEndpoint(LocalServer):
    """A real HTTP server on 127.0.0.1 answering ``POST .../chat/completions`` from a script of
    ``(status, body)`` pairs (the last one repeats; a callable body is called with the request's JSON), after
    ``delay`` seconds; it records each request's headers and JSON body and the most requests in flight at once."""

    def __init__(self, script: list[tuple[int, object]], delay: float = 0.0):
        self.script = list(script)
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        owner = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with lock:
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                    status, payload = owner.script[min(len(owner.requests), len(owner.script)) - 1]
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                time.sleep(delay)
                with lock:
                    owner.in_flight -= 1
                payload = payload(body) if callable(payload) else payload
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        lock = threading.Lock()
        self.start(Handler)


def completion(content: str, logprobs: dict | None = None) -> dict:
    """An OpenAI chat-completions reply with one choice."""
    choice: dict = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "choices": [choice]}
