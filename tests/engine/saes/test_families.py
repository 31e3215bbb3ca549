"""g-SAE, feature-choice, mutual-choice and Matryoshka SAEs against hand implementations, their inference rules,
save/load round trips and their bad files."""

import json

import numpy as np
import pytest
import torch

from engine import load_sae
from engine.saes import SAEConfig
from engine.saes.feature_choice import FeatureChoiceSAE, feature_capacity, feature_choice_codes, feature_choice_thresholds
from engine.saes.gradient_topk import GradientTopKSAE
from engine.saes.mutual_choice import MutualChoiceSAE, mutual_choice_codes, mutual_choice_threshold
from tests.engine.saes_util import D_IN, D_SAE, random_sae

FAMILY_CFG = {
    "gradient_topk": {"k": 8, "gradient_beta": 2.0},
    "feature_choice": {"k": 8},
    "mutual_choice": {"k": 8, "global_threshold": 0.2},
    "jumprelu": {"matryoshka_widths": [32, 96, D_SAE]},
}


def _np(t):
    return t.detach().double().numpy()


def _pre(sae, x):
    p = {n: _np(t) for n, t in sae.named_parameters()}
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], p


def test_feature_choice_batch_rule_is_each_latents_top_m_tokens():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    m = 5
    got = feature_choice_codes(pre, m).numpy()
    want = np.zeros((40, 12))
    for j in range(12):  # column by column: the m largest tokens of each latent, ReLU'd
        col = pre[:, j].numpy()
        for i in np.argsort(-col)[:m]:
            want[i, j] = max(col[i], 0.0)
    np.testing.assert_array_equal(got, want)
    assert ((got > 0).sum(0) <= m).all() and (got > 0).sum(1).std() > 0  # a variable number per token
    assert feature_capacity(8, 4096, 4608) == 7 and feature_capacity(64, 4096, 4608) == 56


def test_mutual_choice_batch_rule_is_the_global_top_kn():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    budget = 4 * 30
    got = mutual_choice_codes(pre, budget).numpy()
    flat = pre.numpy().ravel()
    want = np.zeros_like(flat)
    order = np.argsort(-flat)[:budget]
    want[order] = np.maximum(flat[order], 0)
    np.testing.assert_array_equal(got, want.reshape(30, 20))
    assert (got > 0).sum() == min(budget, int((flat > 0).sum()))


def test_inference_thresholds_reproduce_the_batch_rule_on_their_batch():
    """Stated agreement: every (token, latent) decision on the batch the thresholds were estimated on (100%)."""
    for arch in ("feature_choice", "mutual_choice"):
        sae = random_sae(arch, **FAMILY_CFG[arch])
        x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
        pre_np, p = _pre(sae, x.double().numpy())
        pre = torch.from_numpy(pre_np)
        if arch == "feature_choice":
            m = feature_capacity(8, 64, D_SAE)
            batch = feature_choice_codes(pre, m)
            sae.threshold.data = feature_choice_thresholds(pre, m).float()
        else:
            batch = mutual_choice_codes(pre, 8 * 64)
            sae.cfg.global_threshold = mutual_choice_threshold(pre, 8 * 64)
        inference = sae.encode(x).double()
        assert torch.equal(inference > 0, batch > 0), arch
        torch.testing.assert_close(inference, batch, atol=1e-5, rtol=1e-5)
        # and sae.batch_codes is the same batch rule
        assert isinstance(sae, FeatureChoiceSAE | MutualChoiceSAE)
        torch.testing.assert_close(sae.batch_codes(x).double(), batch, atol=1e-5, rtol=1e-5)


def test_gradient_topk_selection_with_a_known_gradient():
    sae = random_sae("gradient_topk", **FAMILY_CFG["gradient_topk"])
    assert isinstance(sae, GradientTopKSAE)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, D_IN, generator=gen)
    grad = torch.randn(6, D_IN, generator=gen) * 3
    pre, p = _pre(sae, x.double().numpy())
    want = np.zeros_like(pre)
    plain = np.zeros_like(pre)
    for i in range(6):
        influence = np.abs(p["W_dec"] @ grad[i].double().numpy())  # |W_dec^T grad| in the paper's orientation
        score = pre[i] + 2.0 * pre[i] * influence
        keep = np.argsort(-score)[:8]
        want[i, keep] = np.maximum(pre[i, keep], 0)
        plain_keep = np.argsort(-pre[i])[:8]
        plain[i, plain_keep] = np.maximum(pre[i, plain_keep], 0)
    got = sae.encode(x, grad=grad).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.array_equal(got > 0, plain > 0)  # the gradient changed the selection
    out = sae(x, grad=grad)
    np.testing.assert_allclose(out.codes.double().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(out.x_hat.double().numpy(), want @ p["W_dec"] + p["b_dec"], atol=1e-4)
    # without a gradient: plain TopK over z (declared fallback)
    np.testing.assert_allclose(sae.encode(x).double().numpy(), plain, atol=1e-5)
    np.testing.assert_array_equal(sae.admitted_by_gradient(x, grad).numpy(), (want > 0) & ~(plain > 0))
    # a zero gradient (a position with no next-token label) is the plain rule too
    np.testing.assert_allclose(sae.encode(x, grad=torch.zeros_like(grad)).double().numpy(), plain, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(FAMILY_CFG))
def test_each_family_round_trips(arch, tmp_path):
    sae = random_sae(arch, **FAMILY_CFG[arch])
    sae.save(tmp_path / arch)
    raw = json.loads((tmp_path / arch / "cfg.json").read_text())
    back = load_sae(tmp_path / arch)
    assert back.cfg.architecture == arch
    for name, tensor in sae.named_parameters():
        assert torch.equal(tensor, getattr(back, name)), name
    for key, value in FAMILY_CFG[arch].items():
        assert raw[key] == value and getattr(back.cfg, key) == value
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sae.encode(x), back.encode(x))
    if arch != "jumprelu":
        assert raw["inference_rule"] == back.cfg.inference_rule and raw["inference_rule"]
    else:
        assert back.cfg.matryoshka_groups() == [(0, 32), (32, 96), (96, D_SAE)]


def test_bad_family_files(tmp_path):
    sae = random_sae("feature_choice", k=8)
    sae.save(tmp_path / "fc")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "fc" / "sae_weights.safetensors")
    del state["threshold"]
    save_file(state, tmp_path / "fc" / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="feature_choice SAE needs its per-latent inference thresholds"):
        load_sae(tmp_path / "fc")

    random_sae("mutual_choice", k=8, global_threshold=0.1).save(tmp_path / "mc")
    cfg = json.loads((tmp_path / "mc" / "cfg.json").read_text())
    del cfg["global_threshold"]
    (tmp_path / "mc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mutual_choice SAE config has no global_threshold"):
        load_sae(tmp_path / "mc")

    with pytest.raises(ValueError, match=f"matryoshka groups must sum to d_sae={D_SAE}"):
        SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, matryoshka_widths=[32, 96, 200])
    with pytest.raises(ValueError, match="strictly increasing"):
        SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, matryoshka_widths=[96, 32, D_SAE])
    with pytest.raises(ValueError, match="gradient_topk SAE needs 0 < k"):
        SAEConfig(architecture="gradient_topk", d_in=D_IN, d_sae=D_SAE)
    g = random_sae("gradient_topk", k=4)
    assert isinstance(g, GradientTopKSAE)
    with pytest.raises(ValueError, match="loss gradient has shape"):
        g.encode(torch.zeros(3, D_IN), grad=torch.zeros(3, D_IN + 1))
