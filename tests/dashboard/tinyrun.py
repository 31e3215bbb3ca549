"""A small precomputed run built from a tiny random model, for the app's tests (AppTest and the real browser)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

HOOK = "blocks.0.hook_resid_post"
NASTY = '<script>alert("x")</script> </div> & <b>bold</b>'
"""Markup that must show as text wherever the app renders tokens."""

LINES = [
    "In the beginning was the word, and the word was with the model.",
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features in activations.",
    "import numpy as np; x = np.zeros(3)",
    "And God said, Let there be light: and there was light.",
    f"0123456789 {NASTY} 'quotes' \"double\"",
]


def write_corpus(path: Path, n_docs: int = 48) -> Path:
    """A JSONL corpus of shuffled tiny-text lines (it includes HTML that must be escaped)."""
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for _ in range(n_docs):
            order = torch.randperm(len(LINES), generator=gen).tolist()
            f.write(json.dumps({"text": " ".join(LINES[i] for i in order)}) + "\n")
    return path


def make_sae(architecture: str, d_in: int = 64, d_sae: int = 256, seed: int = 0, hook: str = HOOK):
    """A random SAE whose encoder is its decoder's transpose (so latents fire on matching directions); on
    ``attn.hook_z`` (the tiny model's 4 heads x 16) it reads the heads' outputs concatenated."""
    from engine.saes import SAEConfig, build_sae

    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    extra = {"k": 8} if architecture == "topk" else {}
    if architecture == "matching_pursuit":
        extra = {"max_iterations": 16}
    if hook.endswith("attn.hook_z"):
        extra["reshape_activations"] = "hook_z"
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook, **extra)
    state = {"W_dec": W_dec, "b_dec": torch.zeros(d_in)}
    if architecture != "matching_pursuit":
        state.update(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(d_sae))
    return build_sae(cfg, state)


def build_tiny_run(root: Path, architecture: str = "topk", hook: str = HOOK, name: str | None = None, **settings) -> Path:
    """Model, SAE, corpus and a precomputed run under ``root`` (in ``runs/<name or architecture>``; ``settings``:
    ``PrecomputeConfig`` fields); returns the run directory."""
    from engine.model.loading import load_model
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir)
    name = name or architecture
    sae_dir = make_sae(architecture, hook=hook).save(root / f"sae_{name}")
    corpus = write_corpus(root / "corpus.jsonl")
    lm = load_model(model_dir, device="cpu", dtype="float32")
    run = root / "runs" / name
    precompute(lm, load_sae(sae_dir), corpus, run, **{"context_len": 32, **settings}, sae_path=sae_dir, progress=False)
    return run
