"""Live-path benchmark helpers: the contention-robust timing and the steering ratio on a tiny model."""

import time

from engine.tools.bench_live import _token_seconds, _uncontended_seconds, steering_over_baseline

from .saes_util import random_sae


def test_uncontended_seconds_takes_the_fastest_repeat_per_token():
    # a busy spell hits token 1 of run 0 and token 2 of run 1; neither run alone is clean
    runs = [[1.0, 9.0, 1.0], [1.2, 1.0, 7.0], [1.1, 1.1, 1.1]]
    assert _uncontended_seconds(runs) == 1.0 + 1.0 + 1.0


def test_token_seconds_times_each_token():
    def slow():
        for delay in (0.02, 0.0, 0.04):
            time.sleep(delay)
            yield 0

    times = _token_seconds(slow())
    assert len(times) == 3 and times[0] >= 0.02 and times[2] >= 0.04 and times[1] < 0.02


def test_steering_over_baseline_on_a_tiny_model(tiny_llama):
    sae = random_sae("standard", d_in=tiny_llama.d_model, hook="blocks.0.hook_resid_post")
    out = steering_over_baseline(tiny_llama, sae, new_tokens=4, repeats=2)
    assert out["steering_tokens_per_s_ratio"] > 0
    assert out["generation_tokens_per_s"] >= 4 / out["plain_median_run_s"]  # fastest tokens beat the median run
    assert tiny_llama.hooks.installed() == []
