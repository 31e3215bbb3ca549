"""Generation with and without steering: same seed, per-step scopes, and the bad-input errors."""

import pytest
import torch

from engine.live.steering import SteeringSpec, compare, generate, steering_intervention
from tests.engine.saes_util import random_sae


def test_same_seed_same_tokens_and_steering_changes_them(tiny_llama):
    lm = tiny_llama
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    prompt = lm.tokenizer("The quick brown", add_special_tokens=False)["input_ids"]
    a = list(generate(lm, prompt, max_new_tokens=12, seed=3, stop_at_eos=False))
    b = list(generate(lm, prompt, max_new_tokens=12, seed=3, stop_at_eos=False))
    assert a == b and len(a) == 12
    factory = steering_intervention(lm, sae, SteeringSpec({4: 8.0}), max_acts={4: 5.0})
    pairs = list(compare(lm, prompt, factory, max_new_tokens=12, seed=3, stop_at_eos=False))
    assert [p[0] for p in pairs] == a
    assert [p[1] for p in pairs] != a
    # nothing leaks into a later plain call
    assert list(generate(lm, prompt, max_new_tokens=12, seed=3, stop_at_eos=False)) == a


def test_greedy_matches_hf_generate(tiny_llama):
    lm = tiny_llama
    prompt = [5, 17, 42, 8]
    ours = list(generate(lm, prompt, max_new_tokens=8, temperature=0.0, stop_at_eos=False))
    hf = lm.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 4:].tolist()
    assert ours == hf


def test_strength_units(tiny_llama):
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="needs the latents' max activations"):
        steering_intervention(tiny_llama, sae, SteeringSpec({1: 2.0}))
    with pytest.raises(ValueError, match="mode must be"):
        SteeringSpec({1: 2.0}, mode="multiply")
    with pytest.raises(ValueError, match="out of range"):
        steering_intervention(tiny_llama, sae, SteeringSpec({9999: 1.0}, unit="raw"))


def test_clamp_mode_generates(tiny_llama):
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    factory = steering_intervention(tiny_llama, sae, SteeringSpec({2: 1.0}, mode="clamp"), max_acts={2: 30.0})
    tokens = list(generate(tiny_llama, [5, 6, 7], max_new_tokens=5, seed=0, intervention=factory, stop_at_eos=False))
    assert len(tokens) == 5


def test_empty_and_too_long_prompts(tiny_llama):
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate(tiny_llama, []))
    with pytest.raises(ValueError, match="exceed the model's context"):
        list(generate(tiny_llama, [1] * 250, max_new_tokens=10))
