"""A precompute at a real model's shapes without its weights: a random model built from a config (default
Gemma-2-2B's), a random TopK SAE and a corpus of random token ids, against the bare forward to the hook.

``scripts/gpu_check.sh`` runs it on CUDA (65,536 latents, 1M tokens); the tests run it at toy shapes on a CPU.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

GEMMA2_2B = {"vocab_size": 256_000, "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216}
"""Gemma-2-2B's shapes (its config.json); the weights are random."""


def shaped_model(shapes: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random ``gemma2`` model of ``shapes`` built directly on ``device`` (no host copy of the weights), with the
    tiny tokenizer (the corpus is token ids, so the tokenizer only names tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.loading import from_module
    from ..model.tiny import tiny_tokenizer

    cfg = AutoConfig.for_model("gemma2", max_position_embeddings=8192, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                               tie_word_embeddings=True, **shapes)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return from_module(model, tiny_tokenizer(), name=f"random gemma2 {shapes['num_hidden_layers']}x{shapes['hidden_size']}")


def token_corpus(path: Path, n_tokens: int, vocab_size: int, context_len: int, seed: int = 0) -> Path:
    """A Parquet corpus of uniformly random token ids in an ``input_ids`` column, one context per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (n_tokens // context_len, context_len), dtype=np.int64)
    pq.write_table(pa.table({"input_ids": pa.array(list(ids))}), path)
    return path


def shaped_run(*, shapes: dict = GEMMA2_2B, d_sae: int = 65_536, k: int = 64, layer: int | None = None,
               tokens: int = 2**20, context_len: int = 128, batch_size: int = 64, device: str = "auto",
               dtype: str = "auto", work_dir: str | Path | None = None) -> dict:
    """Precompute a random TopK SAE of ``d_sae`` latents on ``tokens`` random tokens of a random model of ``shapes``
    (hook ``blocks.{layer}.hook_resid_post``, the middle layer by default); returns the timings, tokens/s of the
    precompute and of the bare forward on the same contexts (timed before and after; their mean), and peak memory.
    No snapshots: the figure is the pass and the finished run, whatever the device's speed makes of the snapshot
    schedule."""
    from ..data.corpus import iter_contexts
    from ..model.loading import dtype_choice, resolve_device
    from ..precompute.pipeline import precompute
    from .bench import PeakRSS, forward_seconds, random_topk

    dev = resolve_device(device)
    choice = dtype_choice(dtype, dev, shapes["hidden_size"])
    lm = shaped_model(shapes, dev, choice.torch_dtype)
    layer = shapes["num_hidden_layers"] // 2 if layer is None else layer
    sae = random_topk(lm, {"d_sae": d_sae, "k": k, "hook": f"blocks.{layer}.hook_resid_post"})
    hook = sae.cfg.hook_name
    with tempfile.TemporaryDirectory(prefix="saescope-shaped-", dir=work_dir) as tmp:
        # ids within the tokenizer's vocabulary (the corpus check refuses others); which ids does not change the cost
        corpus = token_corpus(Path(tmp) / "tokens.parquet", tokens, len(lm.tokenizer), context_len)
        contexts = list(itertools.islice(iter_contexts(lm.tokenizer, corpus, context_len), tokens // context_len))
        forward_seconds(lm, hook, contexts[:batch_size], batch_size)  # warm-up
        before = forward_seconds(lm, hook, contexts, batch_size)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        started = time.perf_counter()
        with PeakRSS() as rss:
            manifest = precompute(lm, sae, corpus, Path(tmp) / "run", tokens=len(contexts) * context_len,
                                  context_len=context_len, batch_size=batch_size, progress=False, snapshot_tokens=0)
        seconds = time.perf_counter() - started
        after = forward_seconds(lm, hook, contexts, batch_size)
    n = len(contexts) * context_len
    forward = (before + after) / 2
    return {"model": lm.name, "shapes": shapes, "d_sae": d_sae, "k": k, "hook": hook, "tokens": n,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev), "dtype": choice.dtype,
            "precompute_seconds": seconds, "precompute_tokens_per_s": n / seconds,
            "forward_seconds": forward, "forward_seconds_before_after": [before, after],
            "forward_tokens_per_s": n / forward, "precompute_over_forward": seconds / forward,
            "main_pass_over_forward": manifest["timings"]["main_pass_seconds"] / forward,
            "timings": manifest["timings"], "peak_rss_mb": rss.peak_mb,
            "gpu_peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None}


def main(argv: list[str] | None = None) -> None:
    """``python -m engine.tools.bench_shaped [--tokens N] [--d-sae N] [--device D]``: one JSON line on stdout."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=2**20)
    p.add_argument("--d-sae", type=int, default=65_536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    result = shaped_run(d_sae=args.d_sae, k=args.k, tokens=args.tokens, batch_size=args.batch_size, device=args.device)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
