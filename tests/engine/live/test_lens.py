"""Prompt lens and the resumed (tail-only) forward it relies on."""

import pytest
import torch

import engine.live.lens as lens_mod
from engine.live.lens import prompt_lens, tokenize_prompt
from engine.model.tail import can_resume, resume_logits
from engine.model.tiny import tiny_model
from tests.engine.saes_util import random_sae


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
def test_resume_from_hook_equals_full_forward(family, hook):
    lm = tiny_model(family)
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    assert can_resume(lm, hook)
    x = lm.capture(ids, hook)[hook]
    torch.testing.assert_close(resume_logits(lm, hook, x), lm.logits(ids), atol=1e-5, rtol=1e-5)


def test_resume_not_offered_where_unsupported():
    assert not can_resume(tiny_model("llama"), "blocks.0.hook_mlp_out")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma", "gemma2"])
def test_lens_fast_path_equals_fallback(family, monkeypatch):
    lm = tiny_model(family)
    sae = random_sae("topk", hook="blocks.0.hook_resid_post")
    ids = tokenize_prompt(lm, "The quick brown fox jumps over the lazy dog.")
    assert can_resume(lm, "blocks.0.hook_resid_post")
    fast = prompt_lens(lm, sae, ids)
    monkeypatch.setattr(lens_mod, "can_resume", lambda *a: False)
    slow = prompt_lens(lm, sae, ids)
    deltas = [(a.ce_delta, c.ce_delta) for a, c in zip(fast.tokens, slow.tokens, strict=True) if a.ce_delta is not None]
    assert len(deltas) == len(ids) - 1 and any(abs(c) > 1e-3 for _, c in deltas)
    for a, c in deltas:
        assert a == pytest.approx(c, abs=1e-4)


def test_lens_matches_brute_force(tiny_llama):
    lm = tiny_llama
    sae = random_sae("topk", hook="blocks.0.hook_resid_post")
    ids = tokenize_prompt(lm, "The quick brown fox <script>alert(1)</script>")
    result = prompt_lens(lm, sae, ids, top_k=3)
    x = lm.capture(torch.tensor([ids]), "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"][0]
    codes = sae.encode(x)
    assert not result.tokens[0].included and result.tokens[0].top_latents == []
    for tok in result.tokens[1:]:
        values, latents = codes[tok.position].topk(3)
        assert [i for i, _ in tok.top_latents] == latents.tolist()
        assert tok.l0 == int((codes[tok.position] > 0).sum())
        assert tok.err_norm == pytest.approx(float((x[tok.position] - sae(x[tok.position]).x_hat).norm()), rel=1e-4)
    assert "".join(t.token for t in result.tokens) == lm.tokenizer.decode(ids)
    # the codes are kept sparse: only the active ones, and they read back as the dense codes of counted tokens
    dense = codes.clone()
    dense[0] = 0
    assert result.codes.is_sparse and result.codes._nnz() == int((dense > 0).sum())
    torch.testing.assert_close(result.codes.to_dense(), dense)
    for latent in (int(codes[1].argmax()), 0, sae.cfg.d_sae - 1):
        assert result.latent_acts(latent) == pytest.approx(dense[:, latent].tolist())
    torch.testing.assert_close(result.max_per_latent(), dense.max(dim=0).values)
    # the CE delta of the fast path equals a full spliced forward's
    full = lm.logits(torch.tensor([ids]))
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    mask[0, 0] = False
    from engine import splice_sae

    with splice_sae(lm, sae, mask=mask):
        spliced = lm.logits(torch.tensor([ids]))
    targets = torch.tensor(ids[1:])
    delta = torch.nn.functional.cross_entropy(spliced[0, :-1], targets, reduction="none") - torch.nn.functional.cross_entropy(
        full[0, :-1], targets, reduction="none"
    )
    got = torch.tensor([t.ce_delta for t in result.tokens[:-1]])
    torch.testing.assert_close(got, delta, atol=1e-4, rtol=1e-4)
    assert result.tokens[-1].ce_delta is None


def test_lens_linear_split_and_fallback_path(tiny_llama, monkeypatch):
    lm = tiny_llama
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    ids = tokenize_prompt(lm, "def add(a, b): return a + b")
    W, b = torch.eye(64) * 0.5, torch.zeros(64)
    fast = prompt_lens(lm, sae, ids, linear_map=(W, b))
    monkeypatch.setattr(lens_mod, "can_resume", lambda *a: False)
    slow = prompt_lens(lm, sae, ids, linear_map=(W, b))
    for a, c in zip(fast.tokens, slow.tokens, strict=True):
        assert a.err_linear_norm == pytest.approx(c.err_linear_norm, rel=1e-5)
        assert a.err_linear_norm == pytest.approx(0.5 * a.x_norm, rel=1e-5)
        if a.ce_delta is not None:
            assert a.ce_delta == pytest.approx(c.ce_delta, abs=1e-4)


def test_lens_truncates_and_refuses_empty(tiny_llama):
    sae = random_sae("standard", hook="blocks.0.hook_resid_post")
    result = prompt_lens(tiny_llama, sae, list(range(1, 100)), max_tokens=32)
    assert result.truncated and len(result.tokens) == 32 and result.n_input_tokens == 99
    with pytest.raises(ValueError, match="prompt is empty"):
        prompt_lens(tiny_llama, sae, [])


def test_lens_matching_pursuit_steps(tiny_llama):
    sae = random_sae("matching_pursuit", hook="blocks.0.hook_resid_post", residual_threshold=0.0, stop_on_duplicate_support=False)
    ids = list(range(5, 25))
    one = prompt_lens(tiny_llama, sae, ids, encode_kwargs={"max_iterations": 1}, with_ce=False)
    many = prompt_lens(tiny_llama, sae, ids, encode_kwargs={"max_iterations": 12}, with_ce=False)
    assert max(t.l0 for t in one.tokens) == 1 and max(t.l0 for t in many.tokens) > 1


@pytest.mark.parametrize("with_ce", [True, False])
def test_lens_on_a_transcoder_equals_a_hand_encode(tiny_llama, with_ce):
    """Codes from the MLP's input, the error against the true MLP output, the CE delta with the MLP output replaced:
    each by hand on plain torch hooks."""
    from tests.engine.saes_util import mlp_io, random_transcoder

    lm = tiny_llama
    sae = random_transcoder(lm.d_model, layer=1)
    ids = tokenize_prompt(lm, "The quick brown fox jumps over the lazy dog.")
    result = prompt_lens(lm, sae, ids, top_k=3, with_ce=with_ce)
    x, y = mlp_io(lm, torch.tensor([ids]), 1)
    pre = x[0] @ sae.W_enc.double() + sae.b_enc.double()
    cut = pre.topk(sae.cfg.k, dim=-1).values[:, -1:]
    codes = torch.where(pre >= cut, pre.clamp_min(0), 0.0)
    y_hat = codes @ sae.W_dec.double() + sae.b_dec.double()
    mlp = lm.model.model.layers[1].mlp
    keep = torch.tensor([t.included for t in result.tokens])[None, :, None]
    handle = mlp.register_forward_hook(lambda m, a, out: torch.where(keep, y_hat[None].float(), out))
    try:
        with torch.no_grad():
            spliced = lm.model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    finally:
        handle.remove()
    with torch.no_grad():
        clean = lm.model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    target = torch.tensor(ids[1:])
    delta = (clean[torch.arange(len(target)), target] - spliced[torch.arange(len(target)), target]).tolist()
    for tok in result.tokens[1:]:
        assert [i for i, _ in tok.top_latents] == codes[tok.position].topk(3).indices.tolist()
        assert tok.x_norm == pytest.approx(float(x[0, tok.position].norm()), rel=1e-5)
        assert tok.err_norm == pytest.approx(float((y[0, tok.position] - y_hat[tok.position]).norm()), rel=1e-4)
        if with_ce and tok.position < len(ids) - 1:
            assert tok.ce_delta == pytest.approx(delta[tok.position], abs=1e-4)
        else:
            assert tok.ce_delta is None
    assert with_ce is False or any(abs(d) > 1e-3 for d in delta)
