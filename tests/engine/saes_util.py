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


def random_transcoder(d: int, architecture: str = "topk_transcoder", d_sae: int = 96, seed: int = 0, layer: int = 1):
    """A random per-layer transcoder of layer ``layer`` of a tiny model (whose MLP outputs are ~3e-3 per dimension)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_in=d, d_sae=d_sae, d_out=d, k=6 if "topk" in architecture else None,
                    hook_name=f"blocks.{layer}.ln2.hook_normalized", hook_name_out=f"blocks.{layer}.hook_mlp_out",
                    apply_b_dec_to_input=False)
    state = {"W_enc": torch.randn(d, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
             "W_dec": torch.randn(d_sae, d, generator=g) * 2e-4, "b_dec": torch.randn(d, generator=g) * 1e-4}
    if architecture == "skip_transcoder":  # the tiny model's MLP outputs are ~3e-3 per dimension
        state["W_skip"] = torch.randn(d, d, generator=g) * 2e-4
    return build_sae(cfg, state)


def mlp_io(lm, ids, layer: int = 1):
    """The MLP's input and output of layer ``layer``, from plain torch hooks on the transformers module."""
    mlp = lm.model.model.layers[layer].mlp
    got = {}
    h1 = mlp.register_forward_pre_hook(lambda m, args: got.__setitem__("x", args[0].detach().clone()))
    h2 = mlp.register_forward_hook(lambda m, args, out: got.__setitem__("y", out.detach().clone()))
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        h1.remove()
        h2.remove()
    return got["x"].double(), got["y"].double()
