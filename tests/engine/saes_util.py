"""Random SAEs of every architecture for tests."""

import torch

from engine.saes import SAEConfig, build_sae, sae_class

D_IN, D_SAE = 64, 256


def random_sae(
    architecture: str, *, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0, hook: str = "blocks.0.hook_resid_post", **cfg_kw
):
    gen = torch.Generator().manual_seed(seed)
    extra = {"k": 8} if architecture == "topk" else {}
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook, **{**extra, **cfg_kw})
    state = {}
    for name, shape in sae_class(architecture).tensor_shapes(cfg).items():
        scale = 0.3 if name.startswith("W") else 0.1
        state[name] = torch.randn(shape, generator=gen) * scale
    if "threshold" in state:
        state["threshold"] = state["threshold"].abs()
    if architecture == "matching_pursuit":
        state["W_dec"] = state["W_dec"] / state["W_dec"].norm(dim=-1, keepdim=True)
    return build_sae(cfg, state)
