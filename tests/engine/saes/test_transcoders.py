"""Transcoders: the three activations against hand computations, both file formats round-trip, bad files refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.saes.transcoders import (
    Transcoder,
    check_fits,
    load_transcoders,
    read_circuit_tracer,
    read_saelens,
    write_circuit_tracer,
)


def make(layer=1, d_in=6, d_sae=10, d_out=5, k=None, threshold=False, skip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Transcoder(r(d_in, d_sae), r(d_sae), r(d_sae, d_out), r(d_out), f"blocks.{layer}.ln2.hook_normalized",
                      f"blocks.{layer}.hook_mlp_out", k, r(d_sae).abs() if threshold else None,
                      r(d_out, d_in) if skip else None)


def hand(tc, x):
    """numpy: pre, the activation rule, decode (+ skip)."""
    W_enc, b_enc, W_dec, b_dec = (t.numpy().astype(np.float64) for t in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))
    pre = x.numpy().astype(np.float64) @ W_enc + b_enc
    codes = np.zeros_like(pre)
    for i, row in enumerate(pre):
        if tc.k is not None:
            keep = np.argsort(-row)[: tc.k]
            codes[i, keep] = np.maximum(row[keep], 0)
        elif tc.threshold is not None:
            codes[i] = np.where(row > tc.threshold.numpy(), row, 0)
        else:
            codes[i] = np.maximum(row, 0)
    out = codes @ W_dec + b_dec
    if tc.W_skip is not None:
        out = out + x.numpy() @ tc.W_skip.numpy().T
    return codes, out


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu", "skip"])
def test_activations_match_hand_and_both_formats_round_trip(kind, tmp_path):
    tc = make(k=3 if kind == "topk" else None, threshold=kind == "jumprelu", skip=kind == "skip")
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    y, codes = tc(x)
    want_codes, want_y = hand(tc, x)
    np.testing.assert_allclose(codes.numpy(), want_codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-4)
    if kind == "topk":
        assert ((codes > 0).sum(-1) <= 3).all()
    back = read_saelens(tc.save(tmp_path / "saelens", dtype=torch.float32))
    assert back.architecture == tc.architecture and (back.hook_in, back.hook_out, back.k) == (tc.hook_in, tc.hook_out, tc.k)
    torch.testing.assert_close(back(x)[0], y)
    ct = read_circuit_tracer(write_circuit_tracer(tc, tmp_path / "ct"))
    assert ct.layer == 1 and ct.architecture == tc.architecture
    torch.testing.assert_close(ct(x)[0], y)
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["hook_name_out"]) == (6, 10, 5, "blocks.1.hook_mlp_out")


def test_a_set_loads_by_layer_and_is_checked_against_the_model(tmp_path):
    for layer in (0, 2):
        make(layer=layer, seed=layer).save(tmp_path / "set" / f"L{layer}")
    got = load_transcoders(tmp_path / "set")
    assert list(got) == [0, 2] and got[2].W_enc.dtype == torch.float32
    torch.testing.assert_close(got[2].W_enc, make(layer=2, seed=2).W_enc.half().float())
    names = [f"blocks.{L}.{k}" for L in range(3) for k in ("ln2.hook_normalized", "hook_mlp_out")]
    check_fits(got, names, {n: (6 if "ln2" in n else 5) for n in names})
    with pytest.raises(ValueError, match="does not have"):
        check_fits(got, names[:2], {n: (6 if "ln2" in n else 5) for n in names})
    with pytest.raises(ValueError, match="7 wide in this model"):
        check_fits(got, names, {n: 7 for n in names})


def test_bad_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_transcoders(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no transcoder found"):
        load_transcoders(tmp_path / "empty")
    folder = make(skip=True).save(tmp_path / "skip")
    cfg = json.loads((folder / "cfg.json").read_text())
    save_file({n: torch.zeros(s) for n, s in (("W_enc", (6, 10)), ("b_enc", (10,)), ("W_dec", (10, 5)), ("b_dec", (5,)))},
              str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="lacks W_skip"):
        read_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(ValueError, match="not a transcoder"):
        read_saelens(folder)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="layer_<L>"):
        read_circuit_tracer(tmp_path / "bad.safetensors")
    (tmp_path / "layer_3.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_circuit_tracer(tmp_path / "layer_3.safetensors")
    nan = make()
    with pytest.raises(ValueError, match="W_dec holds NaN"):
        Transcoder(nan.W_enc, nan.b_enc, nan.W_dec * float("nan"), nan.b_dec, nan.hook_in, nan.hook_out)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        Transcoder(nan.W_enc, nan.b_enc, nan.W_dec[:3], nan.b_dec, nan.hook_in, nan.hook_out)
