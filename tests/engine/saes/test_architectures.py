"""SAE architectures against independent formulas, formats, round trips and bad files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import architectures, load_sae
from engine.saes import SAEConfig
from tests.engine.saes_util import D_IN, D_SAE, random_sae

REFERENCE = Path(__file__).parents[2] / "fixtures" / "reference"


def _np(t):
    return t.detach().double().numpy()


def brute_force_codes(sae, x: np.ndarray) -> np.ndarray:
    """Encoder written out token by token with numpy, independent of the torch code."""
    p = {n: _np(t) for n, t in sae.named_parameters()}
    cfg = sae.cfg
    out = np.zeros((len(x), cfg.d_sae))
    for i, row in enumerate(x):
        v = row - p["b_dec"] if cfg.apply_b_dec_to_input else row.copy()
        if cfg.architecture == "standard":
            out[i] = np.maximum(v @ p["W_enc"] + p["b_enc"], 0)
        elif cfg.architecture == "jumprelu":
            pre = v @ p["W_enc"] + p["b_enc"]
            out[i] = np.where(pre > p["threshold"], np.maximum(pre, 0), 0)
        elif cfg.architecture == "topk":
            pre = v @ p["W_enc"] + p["b_enc"]
            if cfg.rescale_acts_by_decoder_norm:
                pre = pre * np.linalg.norm(p["W_dec"], axis=1)
            keep = np.argsort(-pre)[: cfg.k]
            out[i, keep] = np.maximum(pre[keep], 0)
        elif cfg.architecture == "gated":
            gate = (v @ p["W_enc"] + p["b_gate"]) > 0
            mag = np.maximum(v @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"], 0)
            out[i] = gate * mag
        elif cfg.architecture == "matching_pursuit":
            residual, support = v.copy(), set()
            for _ in range(cfg.max_iterations or cfg.d_in):
                scores = p["W_dec"] @ residual
                j = int(np.argmax(np.maximum(scores, 0)))
                value = max(float(p["W_dec"][j] @ residual), 0.0)
                out[i, j] += value
                residual = residual - value * p["W_dec"][j]
                new_support = set(np.flatnonzero(out[i]))
                if new_support == support or np.linalg.norm(residual) < cfg.residual_threshold:
                    break
                support = new_support
    return out


def brute_force_decode(sae, codes: np.ndarray) -> np.ndarray:
    p = {n: _np(t) for n, t in sae.named_parameters()}
    if sae.cfg.architecture == "topk" and sae.cfg.rescale_acts_by_decoder_norm:
        codes = codes / np.linalg.norm(p["W_dec"], axis=1)
    out = codes @ p["W_dec"]
    if sae.cfg.architecture != "matching_pursuit" or sae.cfg.apply_b_dec_to_input:
        out = out + p["b_dec"]
    return out


CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("gated", {}),
    ("matching_pursuit", {}),
    ("matching_pursuit", {"max_iterations": 3, "residual_threshold": 0.0}),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(k) or 'default'}" for a, k in CASES])
def test_encode_decode_match_independent_formula(arch, kw):
    sae = random_sae(arch, **kw)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(1))
    codes = sae.encode(x)
    expected = brute_force_codes(sae, x.double().numpy())
    np.testing.assert_allclose(codes.double().numpy(), expected, atol=1e-4)
    assert (codes != 0).any(), "test inputs should make some latents fire"
    np.testing.assert_allclose(_np(sae.decode(codes)), brute_force_decode(sae, expected), atol=1e-4)
    out = sae(x)
    torch.testing.assert_close(out.error, x - out.x_hat.float())
    torch.testing.assert_close(out.x_hat, sae.decode(codes), atol=1e-5, rtol=1e-5)  # sparse decode path


def test_registry_lists_all_architectures():
    assert set(architectures()) >= {"standard", "topk", "jumprelu", "gated", "matching_pursuit"}


def test_matching_pursuit_steps_adjustable_at_inference():
    sae = random_sae("matching_pursuit", residual_threshold=0.0, stop_on_duplicate_support=False)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(2))
    l0 = [int((sae.encode(x, max_iterations=n) != 0).sum(-1).max()) for n in (1, 4, 16)]
    assert l0[0] == 1 and l0[0] <= l0[1] <= l0[2] and l0[2] > 1
    errs = [float((x - sae(x, max_iterations=n).x_hat).norm()) for n in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated", "matching_pursuit"])
def test_save_load_round_trip(arch, tmp_path):
    sae = random_sae(arch)
    sae.save(tmp_path / arch)
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    again = load_sae(tmp_path / arch)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    assert again.cfg.hook_name == sae.cfg.hook_name and again.cfg.d_sae == D_SAE


def test_hook_z_inputs_are_flattened():
    sae = random_sae("standard", hook="blocks.0.attn.hook_z", reshape_activations="hook_z")
    x = torch.randn(2, 3, 4, D_IN // 4)
    out = sae(x)
    assert out.codes.shape == (2, 3, D_SAE) and out.x_hat.shape == x.shape
    torch.testing.assert_close(out.codes, sae.encode(x.flatten(-2)))


# --- exactness against files written by the real SAELens and sparsify libraries ------------------

REFERENCE_CASES = sorted(p.name for p in REFERENCE.iterdir() if p.is_dir() and p.name != "sparsify")


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_saelens_outputs(case):
    expected = load_file(REFERENCE / case / "expected.safetensors")
    sae = load_sae(REFERENCE / case)
    x = expected["x"]
    torch.testing.assert_close(sae.encode(x), expected["codes"], rtol=1e-5, atol=1e-6)
    if sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        x_hat = sae(x).x_hat
    else:
        x_hat = sae.decode(expected["codes"])
    torch.testing.assert_close(x_hat, expected["x_hat"], rtol=1e-5, atol=1e-5)


def test_legacy_config_becomes_topk():
    sae = load_sae(REFERENCE / "legacy_topk")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 5 and sae.cfg.hook_name == "blocks.1.hook_resid_post"


def test_matches_sparsify_outputs():
    folder = REFERENCE / "sparsify" / "layers.1"
    expected = load_file(folder / "expected.safetensors")
    sae = load_sae(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    torch.testing.assert_close(sae.encode(expected["x"]), expected["codes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(expected["x"]).x_hat, expected["x_hat"], rtol=1e-5, atol=1e-5)


def test_sparsify_orientation(tmp_path):
    """sparsify stores encoder.weight [n, d_in] and W_dec [n, d_in]; a non-square SAE pins the orientation."""
    d_in, n = 8, 20
    gen = torch.Generator().manual_seed(3)
    enc, dec = torch.randn(n, d_in, generator=gen), torch.randn(n, d_in, generator=gen)
    folder = tmp_path / "layers.3.mlp"
    folder.mkdir()
    tensors = {"encoder.weight": enc, "encoder.bias": torch.zeros(n), "W_dec": dec, "b_dec": torch.zeros(d_in)}
    save_file(tensors, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"k": 20, "d_in": d_in, "num_latents": n, "expansion_factor": 32}))
    sae = load_sae(folder)
    assert sae.cfg.hook_name == "blocks.3.hook_mlp_out"
    x = torch.randn(4, d_in, generator=gen)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ enc.T))
    codes = torch.zeros(1, n)
    codes[0, 5] = 1.0
    torch.testing.assert_close(sae.decode(codes)[0], dec[5])


# --- bad input ----------------------------------------------------------------------------------


def _write(tmp_path, cfg: dict, tensors: dict) -> Path:
    folder = tmp_path / "sae"
    folder.mkdir(exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def _std_tensors(d_in=D_IN, d_sae=D_SAE):
    return {"W_enc": torch.zeros(d_in, d_sae), "b_enc": torch.zeros(d_sae), "W_dec": torch.zeros(d_sae, d_in),
            "b_dec": torch.zeros(d_in)}


def _v6_cfg(**kw):
    return {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "blocks.0.hook_resid_post"}, **kw}


def test_unknown_architecture_names_known_ones(tmp_path):
    folder = _write(tmp_path, _v6_cfg(architecture="quantum"), _std_tensors())
    expected = r"unknown SAE architecture 'quantum'.*gated.*jumprelu.*matching_pursuit.*standard.*topk"
    with pytest.raises(ValueError, match=expected):
        load_sae(folder)


def test_shape_mismatch_with_config(tmp_path):
    folder = _write(tmp_path, _v6_cfg(d_sae=128), _std_tensors())
    with pytest.raises(ValueError, match=r"W_enc has shape \(64, 256\) but the config .* implies \(64, 128\)"):
        load_sae(folder)


def test_missing_tensor(tmp_path):
    tensors = _std_tensors()
    del tensors["b_enc"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['b_enc'\]"):
        load_sae(_write(tmp_path, _v6_cfg(), tensors))


def test_missing_cfg_key(tmp_path):
    cfg = _v6_cfg()
    del cfg["d_in"]
    with pytest.raises(ValueError, match="missing required key 'd_in'"):
        load_sae(_write(tmp_path, cfg, _std_tensors()))


def test_truncated_safetensors(tmp_path):
    folder = _write(tmp_path, _v6_cfg(), _std_tensors())
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_sae(folder)


def test_garbage_file_is_not_safetensors(tmp_path):
    folder = _write(tmp_path, _v6_cfg(), _std_tensors())
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_sae(folder)


def test_pickle_refused(tmp_path):
    torch.save(_std_tensors(), tmp_path / "sae.pt")
    with pytest.raises(ValueError, match="safetensors only"):
        load_sae(tmp_path / "sae.pt")
    with pytest.raises(ValueError, match="safetensors only"):
        load_sae(tmp_path)


def test_invalid_config_values(tmp_path):
    with pytest.raises(ValueError, match="k <= d_sae"):
        SAEConfig(architecture="topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="normalize_activations 'zscore'"):
        SAEConfig(architecture="standard", d_in=4, d_sae=8, normalize_activations="zscore")


def test_wrong_activation_width():
    sae = random_sae("standard")
    with pytest.raises(ValueError, match="activation width 10 .* d_in=64"):
        sae.encode(torch.randn(3, 10))


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        load_sae("/nonexistent/sae")


def test_fp16_sae_computes_in_fp32_on_cpu(tmp_path):
    sae = random_sae("topk")
    sae.to(torch.float16).save(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "cfg.json").read_text())["dtype"] == "float16"
    assert load_sae(tmp_path / "half").dtype == torch.float32
    assert load_sae(tmp_path / "half", dtype="float16").dtype == torch.float16
