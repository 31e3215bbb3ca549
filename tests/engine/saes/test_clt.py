"""Cross-layer transcoders in circuit-tracer's layout: the fixtures were written by circuit-tracer 0.5.0 itself
(``scripts/make_reference_clt.py``), with its own encodings and reconstructions; bad folders are refused."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.saes import load_sae
from engine.saes.clt import check_clt_fits, load_clt
from engine.saes.transcoders import load_transcoders

REF = Path(__file__).resolve().parents[2] / "fixtures" / "reference_clt"


@pytest.mark.parametrize("case", ["relu", "jumprelu"])
def test_encode_and_outputs_equal_circuit_tracers_own(case):
    clt = load_clt(REF / case)
    want = load_file(str(REF / case / "expected.safetensors"))
    assert (clt.n_layers, clt.d_model, clt.d_sae) == (3, 8, 12) and (clt.threshold is not None) == (case == "jumprelu")
    out, codes = clt.forward(want["x"])
    torch.testing.assert_close(torch.stack(codes), want["features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want["recon"], atol=1e-5, rtol=1e-5)
    # and by hand: layer L's output sums the decoder rows of the features of layers 0..L written to L
    enc = [load_file(str(REF / case / f"W_enc_{i}.safetensors")) for i in range(3)]
    dec = [load_file(str(REF / case / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].double().numpy() for i in range(3)]
    feats = want["features"].double().numpy()
    for L in range(3):
        hand = enc[L][f"b_dec_{L}"].double().numpy() + sum(feats[i] @ dec[i][:, L - i] for i in range(L + 1))
        np.testing.assert_allclose(out[L].numpy(), hand, atol=1e-5)


def test_hooks_come_from_config_yaml_and_are_checked_against_the_model(tmp_path, tiny_llama):
    folder = tmp_path / "clt"
    shutil.copytree(REF / "relu", folder)
    names = tiny_llama.hooks.names()
    widths = dict.fromkeys(names, 8)
    clt = load_clt(folder)  # circuit-tracer's defaults: hook_resid_mid -> hook_mlp_out
    assert (clt.hook_in(1), clt.hook_out(1)) == ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match="hook_resid_mid.*saescope has no hook there"):
        check_clt_fits(clt, names, widths)
    (folder / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: ln2.hook_normalized\n"
                                        "feature_output_hook: hook_mlp_out\n")
    clt = load_clt(folder)
    assert clt.hook_in(0) == "blocks.0.ln2.hook_normalized"
    with pytest.raises(ValueError, match="does not have"):  # the tiny model has 2 layers, the CLT 3
        check_clt_fits(clt, names, widths)
    check_clt_fits(clt, [*names, "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"],
                   {**widths, "blocks.2.ln2.hook_normalized": 8, "blocks.2.hook_mlp_out": 8})
    with pytest.raises(ValueError, match="8 wide"):
        check_clt_fits(clt, [*names, "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"],
                       dict.fromkeys([*names, "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"], 64))
    (folder / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(ValueError, match="not a cross-layer transcoder"):
        load_clt(folder)


def _broken(tmp_path, edit):
    folder = tmp_path / "bad"
    shutil.copytree(REF / "jumprelu", folder)
    edit(folder)
    return folder


def _retensor(folder, file, change):
    t = load_file(str(folder / file))
    change(t)
    save_file(t, str(folder / file))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: (f / "W_dec_1.safetensors").unlink(), "W_dec_1.safetensors is missing"),
    (lambda f: (f / "W_enc_1.safetensors").unlink(), r"layers \[1\] are missing"),
    (lambda f: _retensor(f, "W_enc_0.safetensors", lambda t: t.update(W_skip_0=torch.zeros(8, 8))),
     r"\['W_skip_0'\] are not part of"),
    (lambda f: _retensor(f, "W_enc_2.safetensors", lambda t: t.pop("b_enc_2")), "lacks b_enc_2"),
    (lambda f: _retensor(f, "W_dec_1.safetensors", lambda t: t.update(W_dec_1=torch.zeros(12, 3, 8))),
     r"W_dec_1 is \(12, 3, 8\), expected \(12, 2, 8\)"),
    (lambda f: _retensor(f, "W_enc_1.safetensors", lambda t: t.pop("threshold_1")), "some layers have a JumpReLU"),
    (lambda f: _retensor(f, "W_enc_0.safetensors", lambda t: t["b_dec_0"].fill_(float("nan"))), "b_dec holds NaN"),
    (lambda f: (f / "W_enc_0.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors"),
])
def test_bad_folders_are_refused_with_one_line(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_clt(_broken(tmp_path, edit))


def test_per_layer_tools_and_precompute_refuse_a_clt_clearly():
    with pytest.raises(ValueError, match="not per-layer transcoders: saescope graph reads it"):
        load_transcoders(REF / "relu")
    with pytest.raises(ValueError, match="cross-layer transcoder.*do not support yet"):
        load_sae(REF / "relu")
