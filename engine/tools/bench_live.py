"""Live-path benchmarks: prompt lens vs a bare forward, steered vs unsteered generation (ratios, one run)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator

import torch

from ..live.lens import prompt_lens
from ..live.steering import SteeringSpec, generate, steering_intervention
from ..model.loading import LoadedModel
from ..saes import SAE


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


def _token_seconds(tokens: Iterator[int]) -> list[float]:
    """Wall time to produce each token of a generation (the first includes the prompt's prefill)."""
    times = []
    start = time.perf_counter()
    for _ in tokens:
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def _uncontended_seconds(runs: list[list[float]]) -> float:
    """A run's time without other processes' interference: per token position, the fastest repeat, summed.

    Contention only ever adds time, and a busy spell rarely covers the same position in every repeat, so
    per-position minima over interleaved repeats recover the code's own cost; whole-run medians of a few
    repeats do not (one spell in 2 of 3 runs of one arm moves its median by the spell's length).
    """
    return sum(min(column) for column in zip(*runs, strict=True))


def steering_over_baseline(lm: LoadedModel, sae: SAE, new_tokens: int = 32, repeats: int = 6) -> dict[str, float]:
    """Generation tokens/s steered (two latents, add mode) divided by unsteered, same seed and settings.

    The two arms alternate (plain-steered, steered-plain, ...) after one warm-up each, every token is
    timed, and each arm's time (hence its tokens/s) is ``_uncontended_seconds`` of its repeats;
    ``*_median_run_s`` are ordinary whole-run medians, which include the machine's noise, for comparison.
    """
    prompt = lm.tokenizer("The meaning of the passage is", add_special_tokens=False)["input_ids"]
    spec = SteeringSpec({0: 2.0, 1: -1.0}, unit="raw")
    factory = steering_intervention(lm, sae, spec)

    def run(intervention=None) -> list[float]:
        tokens = generate(lm, prompt, max_new_tokens=new_tokens, temperature=0.0, intervention=intervention, stop_at_eos=False)
        times = _token_seconds(tokens)
        assert len(times) == new_tokens
        return times

    run()  # warm-up, each arm once
    run(factory)
    arms: dict[str, list[list[float]]] = {"plain": [], "steered": []}
    for i in range(repeats):
        order = [("plain", None), ("steered", factory)]
        for name, intervention in order if i % 2 == 0 else order[::-1]:
            arms[name].append(run(intervention))
    p, s = _uncontended_seconds(arms["plain"]), _uncontended_seconds(arms["steered"])
    return {
        "steering_tokens_per_s_ratio": p / s,
        "generation_tokens_per_s": new_tokens / p,
        "steered_tokens_per_s": new_tokens / s,
        "plain_median_run_s": statistics.median(map(sum, arms["plain"])),
        "steered_median_run_s": statistics.median(map(sum, arms["steered"])),
    }


RATIOS = ("lens_over_forward", "steering_tokens_per_s_ratio")
"""The figures docs/performance.md reports: each must be a positive finite number."""


def check_live(result: dict) -> None:
    """ValueError unless both ratios are present and every number in ``result`` is positive and finite."""
    missing = [key for key in RATIOS if key not in result]
    if missing:
        raise ValueError(f"live bench result lacks {', '.join(missing)} (got {sorted(result)})")
    bad = {k: v for k, v in result.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    if bad:
        raise ValueError(f"live bench figures must be positive finite numbers; got {bad}")
