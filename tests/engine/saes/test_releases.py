"""SAEs by SAELens release name, read from a hub cache built here in each release's on-disk layout (no network)."""

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.cli import main
from engine.saes import load_sae, releases

D_IN, D_SAE = 64, 256
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<path>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, data in files.items():
        path = repo / "snapshots" / REVISION / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) / 8, "b_enc": torch.randn(D_SAE, generator=gen) / 4,
            "W_dec": torch.randn(D_SAE, D_IN, generator=gen) / 8, "b_dec": torch.randn(D_IN, generator=gen)}


def _safetensors(tensors: dict[str, torch.Tensor], tmp: Path) -> bytes:
    save_file(tensors, str(tmp))
    return tmp.read_bytes()


def _npz(arrays: dict[str, np.ndarray], tmp: Path) -> bytes:
    np.savez(tmp, **arrays)
    return tmp.read_bytes()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A hub cache with a jbloom GPT-2 SAE (pre-6 SAELens cfg) and Gemma Scope residual and attention SAEs."""
    cache = tmp_path / "hub"
    jb = _weights(0)
    jb_cfg = {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
              "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "mps",
              "activation_fn_str": "relu", "apply_b_dec_to_input": True, "context_size": 128, "l1_coefficient": 8e-05}
    put(cache, "jbloom/GPT2-Small-SAEs-Reformatted", {
        "blocks.8.hook_resid_pre/cfg.json": json.dumps(jb_cfg).encode(),
        "blocks.8.hook_resid_pre/sae_weights.safetensors": _safetensors(jb, tmp_path / "jb.safetensors"),
        "blocks.8.hook_resid_pre/sparsity.safetensors": _safetensors({"sparsity": torch.zeros(D_SAE)}, tmp_path / "s.st"),
    })
    gs = {k: v.numpy() for k, v in _weights(1).items()} | {"threshold": np.abs(np.random.default_rng(2).normal(size=D_SAE))
                                                           .astype(np.float32) / 4}
    put(cache, "google/gemma-scope-2b-pt-res", {"layer_3/width_16k/average_l0_59/params.npz": _npz(gs, tmp_path / "g.npz")})
    att = {k: v.numpy() for k, v in _weights(3).items()} | {"threshold": np.zeros(D_SAE, np.float32)}
    folder = releases.registry()["gemma-scope-2b-pt-att-canonical"].saes["layer_5/width_16k/canonical"]
    put(cache, "google/gemma-scope-2b-pt-att", {f"{folder}/params.npz": _npz(att, tmp_path / "a.npz")})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "jb": jb, "gs": {k: torch.from_numpy(v) for k, v in gs.items()}, "tmp": tmp_path}


def test_jbloom_gpt2_centred_residuals(hub):
    sae = load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    w = hub["jb"]
    x = torch.randn(5, 7, D_IN) * 3 + 2  # a Hugging Face residual: its per-token mean is not zero
    xc = x - x.mean(-1, keepdim=True)  # what TransformerLens with center_writing_weights=True gives the SAE
    expected = torch.relu((xc - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    out = sae(x)
    torch.testing.assert_close(out.codes, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.x_hat, expected @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-4)
    assert sae.cfg.hook_name == "blocks.8.hook_resid_pre" and sae.cfg.architecture == "standard"
    assert sae.cfg.metadata["saelens_release"] == "gpt2-small-res-jb" and sae.cfg.metadata["center_writing_weights_folded"]
    same = engine.load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    torch.testing.assert_close(same.encode(x), out.codes)


def test_gemma_scope_params_npz_jumprelu(hub):
    sae = load_sae("gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical")
    w = hub["gs"]
    x = torch.randn(4, D_IN) * 2
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    codes = torch.relu(pre) * (pre > w["threshold"])
    out = sae(x)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, codes @ w["W_dec"] + w["b_dec"])
    assert (out.codes > 0).any() and (out.codes == 0).any()
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert not sae.cfg.apply_b_dec_to_input and sae.cfg.model_name == "gemma-2-2b"
    att = load_sae("gemma-scope-2b-pt-att-canonical/layer_5/width_16k/canonical")
    assert att.cfg.hook_name == "blocks.5.attn.hook_z" and att.cfg.reshape_activations == "hook_z"
    assert att(torch.randn(3, 8, D_IN // 8)).x_hat.shape == (3, 8, D_IN // 8)  # [..., n_heads, d_head] in and out


def test_unknown_release_or_id_lists_close_matches(hub):
    with pytest.raises(ValueError, match="unknown SAELens release 'gpt2-small-res-jbb'; close matches: gpt2-small-res-jb"):
        load_sae("gpt2-small-res-jbb", sae_id="blocks.8.hook_resid_pre")
    with pytest.raises(FileNotFoundError, match="does not exist, and 'gemma-scope-2b-pt-rez' is no known SAELens release; "
                                                "close matches: gemma-scope-2b-pt-res"):
        load_sae("gemma-scope-2b-pt-rez/layer_3/width_16k/canonical")
    with pytest.raises(ValueError, match="has no SAE 'blocks.8.hook_resid_prex'; close matches: blocks.8.hook_resid_pre"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_prex")
    with pytest.raises(FileNotFoundError, match=r"^SAE path /nonexistent/sae does not exist$"):
        load_sae("/nonexistent/sae")


def test_offline_and_not_cached(hub):
    started = time.perf_counter()
    with pytest.raises(ValueError, match="blocks.4.hook_resid_pre/cfg.json of jbloom/GPT2-Small-SAEs-Reformatted is not in "
                                         "the hub cache .* HF_HUB_OFFLINE is set"):
        load_sae("gpt2-small-res-jb/blocks.4.hook_resid_pre")
    assert time.perf_counter() - started < 5


def test_unreachable_hub_fails_fast(hub, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' conftest sets it at import
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["tmp"] / "empty-cache"))
    started = time.perf_counter()
    expected = (r"cannot reach the Hugging Face hub at http://127.0.0.1:\d+ to download 0-res-sm/cfg.json of "
                r"ctigges/pythia-70m-deduped__res-sm_processed, and it is not cached \(.*refused")
    with pytest.raises(ValueError, match=expected):
        load_sae("pythia-70m-deduped-res-sm/blocks.0.hook_resid_post")
    assert time.perf_counter() - started < 10
    assert not any((hub["tmp"] / "empty-cache").rglob("*.json"))  # nothing half-downloaded left as a file
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))  # what is cached still loads, at once
    assert load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre").cfg.d_sae == D_SAE
    assert time.perf_counter() - started < 10


def test_user_release_file_and_cli(hub, monkeypatch, tmp_path, capsys):
    w = _weights(5)
    v6 = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
          "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_mlp_out", "model_name": "tiny"}}
    put(hub["cache"], "me/my-saes", {"l1/cfg.json": json.dumps(v6).encode(),
                                     "l1/sae_weights.safetensors": _safetensors(w, tmp_path / "w.st")})
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"my-release": {"repo_id": "me/my-saes", "format": "saelens", "model": "tiny",
                                               "saes": {"layer-1": "l1"}}}))
    monkeypatch.setenv(releases.ENV_FILES, str(mine))
    sae = load_sae("my-release/layer-1")
    torch.testing.assert_close(sae.W_enc, w["W_enc"])  # no convention applied
    assert "gpt2-small-res-jb" in releases.registry()  # the shipped list is still there
    assert main(["info", "my-release/layer-1"]) == 0
    assert "hook: blocks.1.hook_mlp_out" in capsys.readouterr().out
    assert main(["info", "my-releas/layer-1"]) == 2
    err = capsys.readouterr().err
    assert "close matches: my-release" in err and "Traceback" not in err


def test_shipped_release_list():
    known = releases.registry()
    assert {"gpt2-small-res-jb", "gemma-scope-2b-pt-res-canonical", "pythia-70m-deduped-res-sm"} <= set(known)
    assert known["gpt2-small-res-jb"].center_writing_weights and not known["pythia-70m-deduped-res-sm"].center_writing_weights
    assert known["gemma-scope-2b-pt-res-canonical"].saes["layer_0/width_16k/canonical"] == "layer_0/width_16k/average_l0_105"
    assert known["mistral-7b-res-wg"].cfg_overrides == {"normalize_activations": "constant_norm_rescale"}
    assert all(r.format in releases.FORMATS for r in known.values())
