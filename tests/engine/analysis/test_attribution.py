"""Head and source-token attribution of attn.hook_z SAEs against eager attention weights and hand-made values;
one-head (hook_head_index) SAEs read, splice and steer their own head only."""

import json

import pytest
import torch
import torch.nn.functional as F

from engine import load_sae
from engine.analysis.dfa import (
    dfa,
    dfa_from_capture,
    dfa_pairs,
    head_decomposition,
    head_term_sums,
    head_weight_shares,
    pair_head_terms,
)
from engine.analysis.interventions import add_vector, check_sae_fits, clamp_latents, splice_sae
from engine.analysis.metrics import per_token_ce
from engine.data.activations import iter_activations
from engine.live.lens import prompt_lens
from engine.model.attention import capture_attention
from engine.model.families import decoder_layers
from engine.model.loading import from_module
from engine.model.tiny import tiny_config, tiny_tokenizer
from tests.engine.saes_util import random_sae

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "gemma", "gemma2"]
N_POS = 12


def _config(family: str):
    cfg = tiny_config(family)
    if family == "gemma2":  # make the window and the soft-capping bite on 12 tokens of a random model
        cfg.sliding_window, cfg.attn_logit_softcapping = 4, 0.05
    return cfg


def _model(family: str, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(_config(family), **extra)


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    """The family's tiny model as saescope runs it, and an eager twin with the same weights (for output_attentions)."""
    model = _model(request.param)
    eager = _model(request.param, "eager")
    eager.load_state_dict(model.state_dict())
    return from_module(model, tiny_tokenizer(), name=f"tiny-{request.param}"), eager.eval()


def _ids(n_batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 300, (n_batch, N_POS), generator=torch.Generator().manual_seed(1))


def _hook_z_sae(lm, layer: int, architecture: str = "standard", **cfg):
    d_in = lm.n_heads * lm.d_head
    return random_sae(architecture, d_in=d_in, hook=f"blocks.{layer}.attn.hook_z", reshape_activations="hook_z", **cfg)


def _values_by_hand(lm, eager, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention weights ``[batch, heads, dest, src]`` and value vectors per query head ``[batch, src, heads,
    d_head]``, the values projected here from the block's input with the weight matrices."""
    out = eager(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    block = decoder_layers(eager, lm.family)[layer]
    H, dh = lm.n_heads, lm.d_head
    if lm.family.name == "gpt2":
        h = block.ln_1(out.hidden_states[layer])
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: x @ W + b, columns [q | k | v]
        v = (h @ W + b)[..., 2 * H * dh :].unflatten(-1, (H, dh))
    elif lm.family.name == "gpt_neox":
        h = block.input_layernorm(out.hidden_states[layer])
        qkv = F.linear(h, block.attention.query_key_value.weight, block.attention.query_key_value.bias)
        v = qkv.unflatten(-1, (H, 3 * dh))[..., 2 * dh :]  # per head [q_h | k_h | v_h]
    else:
        h = block.input_layernorm(out.hidden_states[layer])
        proj = block.self_attn.v_proj
        n_kv = proj.out_features // dh
        v = F.linear(h, proj.weight, proj.bias).unflatten(-1, (n_kv, dh))
        v = v[:, :, torch.arange(H) // (H // n_kv)]  # query head h reads value head h // (H / n_kv)
    return out.attentions[layer].float(), v.float()


@pytest.mark.parametrize("layer", [0, 1])
def test_contributions_match_eager_pattern_and_hand_values(models, layer):
    lm, eager = models
    sae = _hook_z_sae(lm, layer)
    ids = _ids()
    cap = capture_attention(lm, layer, ids)
    pattern, values = _values_by_hand(lm, eager, ids, layer)
    torch.testing.assert_close(cap.pattern, pattern, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap.values, values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.einsum("bhds,bshe->bdhe", cap.pattern, cap.values), cap.z, atol=1e-6, rtol=1e-5)
    if lm.config.model_type == "gemma2" and layer == 0:  # a sliding-window layer: 4 positions back at most
        assert cap.pattern.tril(-4).abs().max() == 0 and cap.pattern.tril(-3).abs().max() > 0

    rows, positions = torch.meshgrid(torch.arange(2), torch.arange(N_POS), indexing="ij")
    latents = torch.arange(2 * N_POS) * 7 % sae.cfg.d_sae
    out = dfa_pairs(sae, cap, latents, positions.flatten(), rows.flatten())
    H, dh = lm.n_heads, lm.d_head
    W = sae.W_enc.detach()
    for p, (r, d, i) in enumerate(zip(rows.flatten().tolist(), positions.flatten().tolist(), latents.tolist(), strict=True)):
        w = W[:, i].view(H, dh)
        expected = torch.zeros(H, N_POS)
        for head in range(H):
            for src in range(d + 1):
                expected[head, src] = pattern[r, head, d, src] * (values[r, src, head] @ w[head])
        torch.testing.assert_close(out.contributions[p], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_contributions_sum_to_the_pre_activation(models, layer):
    lm, _ = models
    sae = _hook_z_sae(lm, layer, seed=3)
    ids = _ids()
    hook = sae.cfg.hook_name
    z = lm.capture(ids, hook)[hook].flatten(-2)  # independent of the attention capture
    pre = (z - sae.b_dec) @ sae.W_enc + sae.b_enc  # [batch, pos, d_sae]
    cap = capture_attention(lm, layer, ids)
    rows, positions = torch.meshgrid(torch.arange(2), torch.arange(N_POS), indexing="ij")
    rows, positions = rows.flatten(), positions.flatten()
    latents = torch.arange(len(rows)) * 11 % sae.cfg.d_sae
    out = dfa_pairs(sae, cap, latents, positions, rows)
    expected = pre[rows, positions, latents]
    torch.testing.assert_close(out.pre, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.contributions.sum((1, 2)) + out.bias, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.bias, sae.b_enc[latents] - sae.b_dec @ sae.W_enc[:, latents])
    # the same split per head, from z alone
    terms = head_decomposition(sae, z.unflatten(-1, (lm.n_heads, lm.d_head)))
    torch.testing.assert_close(terms.sum(-1), pre - sae.b_enc, atol=1e-5, rtol=1e-5)
    b_dec_terms = torch.einsum("he,hel->lh", sae.b_dec.view(lm.n_heads, -1), sae.W_enc.view(lm.n_heads, lm.d_head, -1))
    by_head = out.contributions.sum(-1) - b_dec_terms[latents]  # DFA leaves b_dec in the bias; the head split does not
    torch.testing.assert_close(terms[rows, positions, latents], by_head, atol=1e-5, rtol=1e-5)
    flat = z.unflatten(-1, (lm.n_heads, lm.d_head)).flatten(0, 1)  # [batch * pos, heads, d_head]
    tokens = rows * N_POS + positions
    torch.testing.assert_close(pair_head_terms(sae, flat, tokens, latents), by_head, atol=1e-5, rtol=1e-5)
    # summed per latent over pairs, weighted: one latent named twice, the others never
    latents[3] = latents[5]
    weights = torch.rand(len(tokens), generator=torch.Generator().manual_seed(2))
    sums = head_term_sums(sae, flat, tokens, latents, weights)
    weighted = terms[rows, positions, latents] * weights[:, None]
    expected_sums = torch.zeros(sae.cfg.d_sae, lm.n_heads).index_add_(0, latents, weighted)
    torch.testing.assert_close(sums, expected_sums, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "cfg"),
    [("topk", {"rescale_acts_by_decoder_norm": True}), ("jumprelu", {}), ("gated", {}),
     ("standard", {"normalize_activations": "constant_norm_rescale"}), ("standard", {"apply_b_dec_to_input": False})],
)
def test_other_linear_encoders(tiny_llama, architecture, cfg):
    lm = tiny_llama
    sae = _hook_z_sae(lm, 1, architecture, **cfg)
    ids = _ids(1)
    cap = capture_attention(lm, 1, ids)
    latents, positions = torch.arange(0, 64, 4), torch.arange(16) % N_POS
    out = dfa_pairs(sae, cap, latents, positions)
    x = cap.z[0, positions].flatten(-2)
    sae_in, _, _ = sae.process_in(x)
    W, b = sae.encoder_affine()
    expected = torch.einsum("pd,dp->p", sae_in, W[:, latents]) + b[latents]
    torch.testing.assert_close(out.pre, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.contributions.sum((1, 2)) + out.bias, expected, atol=1e-5, rtol=1e-5)
    if architecture == "topk":  # what topk keeps is the rescaled pre-activation
        codes = sae.encode(x)
        kept = codes[torch.arange(16), latents] > 0
        torch.testing.assert_close(codes[torch.arange(16), latents][kept], expected[kept], atol=1e-5, rtol=1e-5)


def test_nonlinear_encoders_are_refused(tiny_llama):
    lm = tiny_llama
    cap = capture_attention(lm, 1, _ids(1))
    for sae in (_hook_z_sae(lm, 1, "matching_pursuit"), _hook_z_sae(lm, 1, normalize_activations="layer_norm")):
        with pytest.raises(ValueError, match="linear encoder"):
            dfa_pairs(sae, cap, [0], [3])
        with pytest.raises(ValueError, match="linear encoder"):
            dfa(lm, sae, _ids(1)[0].tolist(), 0, 3)
    with pytest.raises(ValueError, match="attn.hook_z"):
        dfa(lm, random_sae("standard", hook="blocks.1.hook_resid_post"), _ids(1)[0].tolist(), 0, 3)


def test_live_dfa_for_one_latent(tiny_llama):
    lm = tiny_llama
    sae = _hook_z_sae(lm, 1, seed=5)
    ids = _ids(1)[0].tolist()
    z = lm.capture(torch.tensor([ids]), sae.cfg.hook_name)[sae.cfg.hook_name][0]
    codes = sae.encode(z)
    position, latent = 7, int(codes[7].argmax())
    result = dfa(lm, sae, ids, latent, position)
    assert result.contributions.shape == (lm.n_heads, position + 1)
    assert result.activation == pytest.approx(float(codes[7, latent]), abs=1e-5) and result.activation > 0
    assert result.pre == pytest.approx(result.activation, abs=1e-5)  # a firing ReLU latent's code is its pre-activation
    assert float(result.by_head().sum()) + result.bias == pytest.approx(result.pre, abs=1e-5)
    assert result.by_source().shape == (position + 1,)
    again = dfa_from_capture(sae, capture_attention(lm, 1, [ids]), latent, position)
    torch.testing.assert_close(again.contributions, result.contributions, atol=1e-6, rtol=1e-5)


def test_head_weight_shares(tiny_llama):
    lm = tiny_llama
    sae = _hook_z_sae(lm, 1)
    shares = head_weight_shares(sae, lm.n_heads)
    assert shares.shape == (sae.cfg.d_sae, lm.n_heads)
    torch.testing.assert_close(shares.sum(-1), torch.ones(sae.cfg.d_sae))
    row = sae.W_dec[17].view(lm.n_heads, lm.d_head)
    torch.testing.assert_close(shares[17], row.pow(2).sum(-1) / row.pow(2).sum())
    one_head = random_sae("standard", d_in=lm.d_head, hook="blocks.1.attn.hook_z", hook_head_index=2)
    torch.testing.assert_close(head_weight_shares(one_head, lm.n_heads), F.one_hot(torch.full((256,), 2), lm.n_heads).float())
    with pytest.raises(ValueError, match="split"):
        head_weight_shares(random_sae("standard", d_in=62), lm.n_heads)


# --- one-head SAEs (hook_head_index) ---------------------------------------------------------------------------

HEAD = 2


def _one_head_sae(lm, **cfg):
    return random_sae("standard", d_in=lm.d_head, hook="blocks.1.attn.hook_z", hook_head_index=HEAD, seed=7, **cfg)


def test_one_head_sae_reads_its_head(tiny_llama):
    lm = tiny_llama
    sae = _one_head_sae(lm)
    ids = _ids(1)
    z = lm.capture(ids, sae.cfg.hook_name)[sae.cfg.hook_name]  # [1, pos, heads, d_head]
    head_codes = torch.relu((z[0, :, HEAD] - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(sae.select_input(z))[0], head_codes)
    with pytest.raises(ValueError, match="select_input"):
        sae(z.flatten(-2))
    batch = next(iter_activations(lm, sae.cfg.hook_name, [ids[0].tolist()], 1, head_index=HEAD))
    torch.testing.assert_close(batch.acts[0], z[0, :, HEAD])
    lens = prompt_lens(lm, sae, ids[0].tolist(), with_ce=False)
    torch.testing.assert_close(lens.codes.to_dense()[1:], head_codes[1:])  # position 0 is left out
    # DFA: only its head contributes
    cap = capture_attention(lm, 1, ids)
    out = dfa_pairs(sae, cap, torch.arange(8), torch.arange(8) + 3)
    others = [h for h in range(lm.n_heads) if h != HEAD]
    assert out.contributions[:, others].abs().max() == 0 and out.contributions[:, HEAD].abs().max() > 0
    expected = (z[0, torch.arange(8) + 3, HEAD] - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(out.pre, expected[torch.arange(8), torch.arange(8)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.contributions.sum((1, 2)) + out.bias, out.pre, atol=1e-5, rtol=1e-5)
    terms = head_decomposition(sae, z[0])
    assert terms[..., others].abs().max() == 0
    diagonal = terms[torch.arange(N_POS), torch.arange(N_POS)]
    torch.testing.assert_close(pair_head_terms(sae, z[0], torch.arange(N_POS), torch.arange(N_POS)), diagonal)
    torch.testing.assert_close(head_term_sums(sae, z[0], torch.arange(N_POS), torch.arange(N_POS))[:N_POS], diagonal)
    torch.testing.assert_close(terms[..., HEAD], (z[0, :, HEAD] - sae.b_dec) @ sae.W_enc)


def _after(lm, hook, ids, scope):
    """The activation at ``hook`` as the next layer sees it, under the interventions of ``scope``."""
    seen = {}
    with scope, lm.hooks.intervene(hook, lambda x: seen.update(x=x.clone())):
        lm.logits(ids)
    return seen["x"]


def test_one_head_sae_writes_its_head_only(tiny_llama):
    lm = tiny_llama
    sae = _one_head_sae(lm)
    hook, ids = sae.cfg.hook_name, _ids(1)
    clean = lm.capture(ids, hook, stop_early=False)[hook]
    others = [h for h in range(lm.n_heads) if h != HEAD]
    mask = torch.ones(ids.shape, dtype=torch.bool)
    spliced = _after(lm, hook, ids, splice_sae(lm, sae, mask=mask))
    torch.testing.assert_close(spliced[..., others, :], clean[..., others, :])
    torch.testing.assert_close(spliced[..., HEAD, :], sae(clean[..., HEAD, :]).x_hat)
    vector = sae.W_dec[5]
    steered = _after(lm, hook, ids, add_vector(lm, hook, vector, head_index=HEAD))
    expected = clean.clone()
    expected[..., HEAD, :] += vector
    torch.testing.assert_close(steered, expected)
    clamped = _after(lm, hook, ids, clamp_latents(lm, sae, {5: 3.0}))
    torch.testing.assert_close(clamped[..., others, :], clean[..., others, :])
    delta = (3.0 - sae.encode(clean[..., HEAD, :])[..., 5, None]) * sae.W_dec[5]
    torch.testing.assert_close(clamped[..., HEAD, :], clean[..., HEAD, :] + delta)
    losses = per_token_ce(lm, sae, ids, mask)  # zero ablation of one head, not of the whole hook
    assert losses["zero"].shape == (1, N_POS - 1) and torch.isfinite(losses["sae"]).all()


def test_one_head_sae_config(tiny_llama, tmp_path):
    lm = tiny_llama
    sae = _one_head_sae(lm)
    assert check_sae_fits(lm, sae) == "blocks.1.attn.hook_z"
    sae.save(tmp_path / "v6")
    assert json.loads((tmp_path / "v6" / "cfg.json").read_text())["metadata"]["hook_head_index"] == HEAD
    assert load_sae(tmp_path / "v6").cfg.hook_head_index == HEAD
    legacy = sae.cfg.to_saelens_dict()
    legacy.pop("metadata")
    legacy.update(hook_point="blocks.1.attn.hook_z", hook_point_head_index=1, d_in=lm.d_head)
    (tmp_path / "v6" / "cfg.json").write_text(json.dumps(legacy))
    assert load_sae(tmp_path / "v6").cfg.hook_head_index == 1
    with pytest.raises(ValueError, match="per-head hook"):
        check_sae_fits(lm, random_sae("standard", d_in=lm.d_head, hook="blocks.1.hook_resid_post", hook_head_index=0))
    with pytest.raises(ValueError, match="out of range"):
        check_sae_fits(lm, random_sae("standard", d_in=lm.d_head, hook="blocks.1.attn.hook_z", hook_head_index=9))
    with pytest.raises(ValueError, match="contradicts"):
        random_sae("standard", d_in=lm.d_head, hook_head_index=0, reshape_activations="hook_z")


def test_capture_leaves_other_threads_alone(tiny_llama):
    import threading

    lm = tiny_llama
    ids = _ids(1)
    clean = lm.logits(ids)
    results = []

    def other():
        for _ in range(20):
            results.append(torch.equal(lm.logits(ids), clean))

    thread = threading.Thread(target=other)
    thread.start()
    for _ in range(20):
        capture_attention(lm, 1, ids)
    thread.join()
    assert all(results)
