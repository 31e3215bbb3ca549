"""Live-path benchmarks: prompt lens vs a bare forward, steered vs unsteered generation (ratios, one run)."""

from __future__ import annotations

import statistics
import time

import torch

from .lens import prompt_lens
from .models import LoadedModel
from .saes import SAE
from .steering import SteeringSpec, generate, steering_intervention


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lens_over_forward(lm: LoadedModel, sae: SAE, n_tokens: int = 128, repeats: int = 7) -> dict[str, float]:
    """Median prompt-lens time (with per-token CE delta) over a bare full forward of the same prompt."""
    ids = torch.randint(3, lm.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = torch.tensor([ids])
    # interleave the two measurements so machine noise hits both alike
    bare, lens = [], []
    for _ in range(repeats):
        bare.append(_median_seconds(lambda: lm.logits(batch), 1))
        lens.append(_median_seconds(lambda: prompt_lens(lm, sae, ids), 1))
    b, l_ = statistics.median(bare), statistics.median(lens)
    return {"lens_over_forward": l_ / b, "lens_ms": l_ * 1e3, "bare_forward_ms": b * 1e3, "lens_tokens": n_tokens}


def steering_over_baseline(lm: LoadedModel, sae: SAE, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
    """Generation tokens/s steered (two latents, add mode) divided by unsteered, same seed and settings."""
    prompt = lm.tokenizer("The meaning of the passage is", add_special_tokens=False)["input_ids"]
    spec = SteeringSpec({0: 2.0, 1: -1.0}, unit="raw")
    factory = steering_intervention(lm, sae, spec)

    def run(intervention=None):
        n = sum(1 for _ in generate(lm, prompt, max_new_tokens=new_tokens, temperature=0.0, intervention=intervention, stop_at_eos=False))
        assert n == new_tokens

    plain, steered = [], []
    for _ in range(repeats):
        plain.append(_median_seconds(run, 1))
        steered.append(_median_seconds(lambda: run(factory), 1))
    p, s = statistics.median(plain), statistics.median(steered)
    return {
        "steering_tokens_per_s_ratio": p / s,
        "generation_tokens_per_s": new_tokens / p,
        "steered_tokens_per_s": new_tokens / s,
    }
