"""Tiny random models and tokenizers built from a config: for tests, benchmarks and smoke runs, no network."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import LoadedModel, from_module

TINY_TEXT = (
    "In the beginning was the word, and the word was with the model. "
    "def add(a, b):\n    return a + b\n"
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in activations. "
    "import numpy as np; x = np.zeros(3)\n"
    "And God said, Let there be light: and there was light. 0123456789 <b>bold</b> & 'quotes' \"double\"\n"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few lines, with ``<|endoftext|>`` as BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_config(family: str = "llama", *, vocab_size: int = 384, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                n_positions: int = 256):
    """A transformers config for a 2-layer random model of ``family``."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_positions, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=2 * d_model, max_position_embeddings=n_positions, **common,
        )
    model_type = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2"}[family]
    extra = {"head_dim": d_model // n_heads} if family.startswith("gemma") else {}
    return AutoConfig.for_model(
        model_type, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2), intermediate_size=2 * d_model, max_position_embeddings=n_positions,
        tie_word_embeddings=True, **extra, **common,
    )


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: int) -> LoadedModel:
    """A randomly initialised tiny model of ``family`` with the tiny tokenizer, wrapped with hooks."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=dtype)
    return from_module(model, tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny_model(path: str | Path, family: str = "llama", *, seed: int = 0) -> Path:
    """Write a tiny random model and its tokenizer to ``path`` (loadable with ``load_model``)."""
    path = Path(path)
    lm = tiny_model(family, seed=seed)
    lm.hf_model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
