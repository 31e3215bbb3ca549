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
    """Clamping latent 2 at 1.0 max activation (30.0) gives the logits and the generation of a hand-written clamp: a
    plain torch hook on layer 0's output adding ``(30 - f_2(x)) * W_dec[2]`` (``f_2`` the ReLU encoder written out),
    greedy decoding recomputed from the whole sequence at each step (no KV cache)."""
    lm = tiny_llama
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    factory = steering_intervention(lm, sae, SteeringSpec({2: 1.0}, mode="clamp"), max_acts={2: 30.0})
    prompt = [5, 6, 7]
    tokens = list(generate(lm, prompt, max_new_tokens=5, temperature=0.0, intervention=factory, stop_at_eos=False))

    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert sae.cfg.apply_b_dec_to_input

    def clamp(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h.double()
        f2 = torch.relu((x - b_dec) @ W_enc[:, 2] + b_enc[2])
        new = (x + (30.0 - f2)[..., None] * W_dec[2]).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def greedy(hooked: bool) -> tuple[list[int], torch.Tensor]:
        """Five greedy tokens, and the logits of the prompt and all but the last of them."""
        ids = list(prompt)
        handle = lm.hf_model.model.layers[0].register_forward_hook(clamp) if hooked else None
        try:
            with torch.inference_mode():
                for _ in range(5):
                    logits = lm.hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                    ids.append(int(logits[-1].argmax()))
        finally:
            if handle is not None:
                handle.remove()
        return ids[len(prompt):], logits

    want_tokens, want_logits = greedy(hooked=True)
    assert tokens == want_tokens
    with factory(), torch.inference_mode():
        got_logits = lm.logits(torch.tensor([prompt + tokens[:-1]]))[0]
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    plain = list(generate(lm, prompt, max_new_tokens=5, temperature=0.0, stop_at_eos=False))
    plain_tokens, _ = greedy(hooked=False)
    assert plain == plain_tokens and plain != tokens, "the clamp changes what is generated"


def test_empty_and_too_long_prompts(tiny_llama):
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate(tiny_llama, []))
    with pytest.raises(ValueError, match="exceed the model's context"):
        list(generate(tiny_llama, [1] * 250, max_new_tokens=10))


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steering_a_transcoder_writes_at_the_mlp_output(tiny_llama, mode):
    """Adding a latent puts its decoder row on the MLP output; clamping it moves the MLP output by (c - a) times the
    row, with a from a hand encode of the MLP input: both against plain torch hooks on the transformers module."""
    from tests.engine.saes_util import mlp_io, random_transcoder

    sae = random_transcoder(tiny_llama.d_model, layer=1)
    ids = torch.tensor([[5, 9, 14, 20, 33, 41]])
    latent, value = 7, 40.0
    factory = steering_intervention(tiny_llama, sae, SteeringSpec({latent: value}, mode=mode, unit="raw"))
    with factory():
        got = tiny_llama.logits(ids)
    x, _ = mlp_io(tiny_llama, ids, 1)
    pre = x @ sae.W_enc.double() + sae.b_enc.double()
    codes = torch.where(pre >= pre.topk(sae.cfg.k, dim=-1).values[..., -1:], pre.clamp_min(0), 0.0)
    coeff = value - codes[..., latent:latent + 1] if mode == "clamp" else torch.full_like(codes[..., :1], value)
    delta = (coeff * sae.W_dec[latent].double()).float()
    handle = tiny_llama.model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out + delta)
    try:
        with torch.no_grad():
            want = tiny_llama.model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-4)
    assert (got - tiny_llama.logits(ids)).abs().max() > 1e-3
