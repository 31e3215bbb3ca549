"""Live-path benchmark helpers: the contention-robust timing, the prompt-lens and steering ratios on a tiny model
(structure and sanity, no timing targets), and the bench failing when they fail."""

import math
import time

import pytest

from engine.tools import bench_live
from engine.tools.bench import LiveBenchError, _live
from engine.tools.bench_live import (
    _token_seconds,
    _uncontended_seconds,
    check_live,
    lens_over_forward,
    steering_over_baseline,
)
from tests.engine.saes_util import random_sae


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_uncontended_seconds_takes_the_fastest_repeat_per_token():
    # a busy spell hits token 1 of run 0 and token 2 of run 1; neither run alone is clean
    runs = [[1.0, 9.0, 1.0], [1.2, 1.0, 7.0], [1.1, 1.1, 1.1]]
    assert _uncontended_seconds(runs) == 1.0 + 1.0 + 1.0
    with pytest.raises(ValueError):  # repeats of different lengths are a bug, not a measurement
        _uncontended_seconds([[1.0, 2.0], [1.0]])


def test_token_seconds_times_each_token():
    def slow():
        for delay in (0.02, 0.0, 0.04):
            time.sleep(delay)
            yield 0

    times = _token_seconds(slow())
    assert len(times) == 3 and times[0] >= 0.02 and times[2] >= 0.04 and times[1] < 0.02


def test_lens_over_forward_on_a_tiny_model(tiny_llama):
    sae = random_sae("topk", d_in=tiny_llama.d_model, hook="blocks.0.hook_resid_post")
    out = lens_over_forward(tiny_llama, sae, n_tokens=24, repeats=2)
    assert set(out) == {"lens_over_forward", "lens_ms", "bare_forward_ms", "lens_tokens"}
    assert out["lens_tokens"] == 24
    for key in ("lens_over_forward", "lens_ms", "bare_forward_ms"):
        assert _positive_finite(out[key]), (key, out[key])
    # the ratio is the two medians' quotient, not measured separately
    assert out["lens_over_forward"] == pytest.approx(out["lens_ms"] / out["bare_forward_ms"], rel=1e-9)
    assert tiny_llama.hooks.installed() == []


def test_steering_over_baseline_on_a_tiny_model(tiny_llama):
    sae = random_sae("standard", d_in=tiny_llama.d_model, hook="blocks.0.hook_resid_post")
    out = steering_over_baseline(tiny_llama, sae, new_tokens=4, repeats=2)
    assert set(out) == {"steering_tokens_per_s_ratio", "generation_tokens_per_s", "steered_tokens_per_s",
                        "plain_median_run_s", "steered_median_run_s"}
    for key, value in out.items():
        assert _positive_finite(value), (key, value)
    # tokens/s ratio = steered tokens/s over plain tokens/s
    assert out["steering_tokens_per_s_ratio"] == pytest.approx(out["steered_tokens_per_s"] / out["generation_tokens_per_s"])
    # per-token minima over repeats never exceed a whole median run
    assert out["generation_tokens_per_s"] >= 4 / out["plain_median_run_s"] * (1 - 1e-9)
    assert out["steered_tokens_per_s"] >= 4 / out["steered_median_run_s"] * (1 - 1e-9)
    assert tiny_llama.hooks.installed() == []
    check_live(out | {"lens_over_forward": 1.0})


def test_check_live_refuses_missing_or_unusable_figures():
    good = {"lens_over_forward": 1.3, "steering_tokens_per_s_ratio": 0.98, "lens_tokens": 128}
    check_live(good)
    for bad in ({**good, "lens_over_forward": float("nan")}, {**good, "steering_tokens_per_s_ratio": 0.0},
                {**good, "lens_ms": float("inf")}, {**good, "error": "boom"}, {"lens_over_forward": 1.0}):
        with pytest.raises(ValueError):
            check_live(bad)


def test_bench_live_failure_fails_the_bench(tiny_llama, monkeypatch):
    """``bench._live`` used to turn any error into a string in the result; now the bench stops, naming the part."""
    sae = random_sae("topk", d_in=tiny_llama.d_model, hook="blocks.0.hook_resid_post")

    def broken(lm, sae):
        raise IndexError("token id out of range")

    monkeypatch.setattr(bench_live, "lens_over_forward", broken)
    with pytest.raises(LiveBenchError, match=r"prompt lens .*lens_over_forward.*IndexError: token id out of range"):
        _live(tiny_llama, sae)

    monkeypatch.setattr(bench_live, "lens_over_forward", lambda lm, sae: {"lens_over_forward": float("nan")})
    monkeypatch.setattr(bench_live, "steering_over_baseline", lambda lm, sae: {"steering_tokens_per_s_ratio": 1.0})
    with pytest.raises(LiveBenchError, match="positive finite"):
        _live(tiny_llama, sae)


def test_bench_live_results_pass_through(tiny_llama, monkeypatch):
    sae = random_sae("topk", d_in=tiny_llama.d_model, hook="blocks.0.hook_resid_post")
    monkeypatch.setattr(bench_live, "lens_over_forward", lambda lm, sae: {"lens_over_forward": 1.25, "lens_tokens": 128})
    monkeypatch.setattr(bench_live, "steering_over_baseline", lambda lm, sae: {"steering_tokens_per_s_ratio": 0.97})
    assert _live(tiny_llama, sae) == {"lens_over_forward": 1.25, "lens_tokens": 128, "steering_tokens_per_s_ratio": 0.97}
