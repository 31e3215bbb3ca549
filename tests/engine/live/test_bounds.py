"""The live APIs bound what a user (or a crafted URL) can ask for: a prompt's characters before tokenizing and its
tokens against the model's context, the number of steered latents, and finite strengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.analysis.dfa import dfa
from engine.analysis.interventions import MAX_STEERED_LATENTS, clamp_latents, steering_vector
from engine.live.lens import MAX_PROMPT_CHARS, prompt_lens, tokenize_prompt
from engine.live.steering import SteeringSpec, generate, steering_intervention
from tests.engine.saes_util import random_sae


def test_a_prompt_past_the_character_cap_is_refused_before_tokenizing(tiny_llama, monkeypatch):
    calls = []
    tokenizer = type(tiny_llama.tokenizer)
    original = tokenizer.__call__
    monkeypatch.setattr(tokenizer, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    text = "a " * (MAX_PROMPT_CHARS // 2) + "!"
    for chat in (False, True):
        with pytest.raises(ValueError, match=f"{len(text):,} characters: at most {MAX_PROMPT_CHARS:,}"):
            tokenize_prompt(tiny_llama, text, chat=chat)
    assert calls == [], "the prompt was tokenized before it was refused"
    assert len(tokenize_prompt(tiny_llama, text[:MAX_PROMPT_CHARS])) > tiny_llama.max_context
    assert calls == [1]


def test_a_prompt_is_capped_in_tokens_by_the_context(tiny_llama):
    lm = tiny_llama
    ids = [5 + i % 200 for i in range(lm.max_context + 40)]
    result = prompt_lens(lm, random_sae("standard", hook="blocks.0.hook_resid_post"), ids, with_ce=False)
    assert result.truncated and len(result.tokens) == lm.max_context and result.n_input_tokens == len(ids)
    with pytest.raises(ValueError, match="exceed the model's context"):
        next(generate(lm, ids, max_new_tokens=4))
    d_in = lm.n_heads * lm.d_head
    sae = random_sae("standard", d_in=d_in, hook="blocks.1.attn.hook_z", reshape_activations="hook_z")
    with pytest.raises(ValueError, match=f"past the model's context of {lm.max_context} tokens"):
        dfa(lm, sae, ids, 0, lm.max_context + 10)
    assert dfa(lm, sae, ids, 0, lm.max_context - 1).contributions.shape[1] == lm.max_context


def test_steering_thousands_of_latents_is_refused(tiny_llama):
    sae = random_sae("standard", d_sae=4096, hook="blocks.0.hook_resid_post")  # the ids are all real latents
    many = {i: 1.0 for i in range(2000)}
    for spec in ({"strengths": many, "unit": "raw"}, {"strengths": many, "unit": "raw", "mode": "clamp"}):
        with pytest.raises(ValueError, match=f"2000 latents to steer: at most {MAX_STEERED_LATENTS}"):
            SteeringSpec(**spec)
    with pytest.raises(ValueError, match="at most"):
        steering_vector(sae, many)
    with pytest.raises(ValueError, match="at most"), clamp_latents(tiny_llama, sae, many):
        pass
    most = {i: 0.01 for i in range(MAX_STEERED_LATENTS)}
    factory = steering_intervention(tiny_llama, sae, SteeringSpec(most, unit="raw"))
    assert len(list(generate(tiny_llama, [5, 6, 7], max_new_tokens=2, intervention=factory, stop_at_eos=False))) == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan"), "2", None, True])
def test_strengths_must_be_finite_numbers(tiny_llama, bad):
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    refused = "strength of latent 3 must be a finite number"
    with pytest.raises(ValueError, match=refused):
        SteeringSpec({1: 1.0, 3: bad}, unit="raw")
    with pytest.raises(ValueError, match=refused):
        steering_vector(sae, {3: bad})
    with pytest.raises(ValueError, match=refused), clamp_latents(tiny_llama, sae, {3: bad}):
        pass


def test_overflowing_strengths_and_bad_ids_are_refused(tiny_llama):
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="steering vector is not finite"):
        steering_vector(sae, {1: 1e39})  # finite in Python, past float32
    with pytest.raises(ValueError, match="steering vector is not finite"):
        steering_intervention(tiny_llama, sae, SteeringSpec({1: 1e30}), max_acts={1: 1e30})
    with pytest.raises(ValueError, match="max activations of latents .* not finite"):
        steering_intervention(tiny_llama, sae, SteeringSpec({1: 1.0}), max_acts={1: math.nan})
    with pytest.raises(ValueError, match="do not fit in float32"), clamp_latents(tiny_llama, sae, {1: 1e300}):
        pass
    for latent in (1.5, "1", -1):
        with pytest.raises(ValueError, match="latent ids are"):
            SteeringSpec({latent: 1.0}, unit="raw")  # type: ignore[dict-item]
    steered = steering_vector(sae, {np.int64(2): np.float32(0.5)})  # numpy scalars are numbers
    torch.testing.assert_close(steered, 0.5 * sae.W_dec[2].float())
