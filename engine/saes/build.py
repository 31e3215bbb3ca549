"""An SAE from its config and tensors: every tensor's presence, shape and values checked first."""

from __future__ import annotations

import torch
from torch import nn

from .base import SAE, sae_class
from .config import SAEConfig


def build_sae(
    cfg: SAEConfig, state: dict[str, torch.Tensor], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SAE:
    """Instantiate and fill an SAE, checking every tensor's presence and shape first."""
    cls = sae_class(cfg.architecture)
    expected = cls.tensor_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    if missing:
        if cls.missing_hint and set(missing) <= set(expected) - set(SAE.tensor_shapes(cfg)):
            raise ValueError(f"{cls.missing_hint} (missing {missing})")
        raise ValueError(f"{cfg.architecture} SAE is missing tensor(s) {missing} (file has {sorted(state)})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{cfg.architecture} SAE file has unexpected tensor(s) {unexpected}; expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(state[name].shape)} but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) implies {shape}"
            )
    for name, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"tensor {name} of the {cfg.architecture} SAE holds {bad} NaN or infinite value(s) of "
                                 f"{tensor.numel()}: the file is corrupt or training diverged")
    target = dtype or state["W_dec"].dtype
    with torch.device("meta"):  # no placeholder weights: a 1M-latent SAE is loaded once, not twice
        sae = cls(cfg)
    for name, tensor in state.items():
        setattr(sae, name, nn.Parameter(tensor.to(device=device, dtype=target), requires_grad=False))
    cfg.dtype = str(target).removeprefix("torch.")
    return sae
