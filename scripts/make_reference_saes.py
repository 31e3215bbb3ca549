"""Write SAEs with the real SAELens and sparsify libraries, plus their outputs, for saescope's exactness tests.

Run in a separate environment that has them (they are not saescope dependencies):
    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 sae-lens eai-sparsify
    /tmp/refvenv/bin/python scripts/make_reference_saes.py tests/fixtures/reference
Each case directory holds the SAE as the library saved it and `expected.safetensors`
(x, codes, x_hat computed by the library itself).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D_IN, D_SAE = 16, 48


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "W" in name or "weight" in name else 0.2))


def _inputs(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, D_IN, generator=gen) * 2 + 0.5


def saelens_cases(out: Path) -> None:
    import sae_lens
    from sae_lens import SAE

    print("sae-lens", sae_lens.__version__)
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}
    cases = {
        "standard": (StandardSAE, StandardSAEConfig, {}),
        "standard_no_bdec_in": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
        "standard_constant_norm": (StandardSAE, StandardSAEConfig, {"normalize_activations": "constant_norm_rescale"}),
        "standard_layer_norm": (StandardSAE, StandardSAEConfig, {"normalize_activations": "layer_norm"}),
        "standard_expected_average": (StandardSAE, StandardSAEConfig, {"normalize_activations": "expected_average_only_in"}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": 6}),
        "topk_rescale": (TopKSAE, TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
        "gated": (GatedSAE, GatedSAEConfig, {}),
        "matching_pursuit": (MatchingPursuitSAE, MatchingPursuitSAEConfig, {"residual_threshold": 0.5}),
        "matching_pursuit_steps": (
            MatchingPursuitSAE, MatchingPursuitSAEConfig, {"max_iterations": 3, "residual_threshold": 0.0}
        ),
    }
    for i, (name, (cls, cfg_cls, extra)) in enumerate(cases.items()):
        cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra)
        cfg.metadata.hook_name = meta["hook_name"]
        cfg.metadata.model_name = meta["model_name"]
        sae = cls(cfg)
        _randomize(sae, seed=i)
        if name == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(D_SAE) * 0.8)
        folder = out / name
        sae.save_model(folder)
        loaded = SAE.load_from_disk(folder)
        x = _inputs(100 + i)
        with torch.no_grad():
            codes = loaded.encode(x)
            plain = cfg.normalize_activations not in ("constant_norm_rescale", "layer_norm")
            x_hat = loaded.decode(codes) if plain else loaded(x)
        save_file({"x": x, "codes": codes.contiguous(), "x_hat": x_hat.contiguous()}, folder / "expected.safetensors")

    # A pre-6.0 flat config, loaded through SAELens' own legacy path.
    folder = out / "legacy_topk"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(42)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.5,
        "b_dec": torch.randn(D_IN, generator=gen) * 0.2,
    }
    save_file(weights, folder / "sae_weights.safetensors")
    legacy = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1, "hook_head_index": None,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "sae_lens_training_version": "5.9.1", "prepend_bos": True,
        "dataset_path": "x", "dataset_trust_remote_code": True, "context_size": 128,
        "normalize_activations": "none", "neuronpedia_id": None, "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    (folder / "cfg.json").write_text(json.dumps(legacy))
    loaded = SAE.load_from_disk(folder)
    print("legacy loads as", type(loaded).__name__)
    x = _inputs(200)
    with torch.no_grad():
        codes = loaded.encode(x)
        x_hat = loaded.decode(codes)
    save_file({"x": x, "codes": codes.contiguous(), "x_hat": x_hat.contiguous()}, folder / "expected.safetensors")


def sparsify_cases(out: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=7))
    _randomize(coder, seed=7)
    folder = out / "sparsify" / "layers.1"
    coder.save_to_disk(folder)
    loaded = SparseCoder.load_from_disk(folder)
    x = _inputs(300).reshape(-1, D_IN)
    with torch.no_grad():
        enc = loaded.encode(x)
        x_hat = loaded.decode(enc.top_acts, enc.top_indices)
        codes = torch.zeros(x.shape[0], D_SAE).scatter_(-1, enc.top_indices, enc.top_acts)
    save_file({"x": x, "codes": codes, "x_hat": x_hat}, folder / "expected.safetensors")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/reference")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    saelens_cases(target)
    sparsify_cases(target)
    print("wrote", target)
