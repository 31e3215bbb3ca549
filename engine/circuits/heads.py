"""Each attention head's output ("hook_result"): its ``z`` through its slice of the output projection.

The output projection of every family is affine (``nn.Linear`` in Llama/NeoX/Gemma, GPT-2's transposed
``Conv1D``), so its matrix is read by applying it to the identity and to zero, whatever the module's weight layout:
``W_O = out(I) - out(0)`` as ``[n_heads, d_head, d_model]`` and ``b_O = out(0)``. A projection that is not affine
(a quantized or fused kernel) fails the check and the family has no per-head decomposition: a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.families import decoder_layers, get_path
from ..model.loading import LoadedModel


@dataclass(frozen=True)
class OutputProjection:
    """One layer's ``W_O [n_heads, d_head, d_model]`` and ``b_O [d_model]`` (float32)."""

    weight: torch.Tensor
    bias: torch.Tensor


@torch.inference_mode()
def output_projection(lm: LoadedModel, layer: int) -> OutputProjection:
    """Layer ``layer``'s output projection as a per-head matrix, or a ValueError when it is not affine."""
    block = decoder_layers(lm.model, lm.family)[layer]
    out = get_path(block, f"{lm.family.attn}.{lm.family.out_proj}")
    if out is None:
        raise ValueError(f"the {lm.family.name} family has no attention output projection "
                         f"{lm.family.attn}.{lm.family.out_proj}: no per-head decomposition")
    width = lm.n_heads * lm.d_head
    eye = torch.eye(width, device=lm.device, dtype=lm.dtype)
    zero = torch.zeros(1, width, device=lm.device, dtype=lm.dtype)
    try:
        bias = out(zero)[0].float()
        matrix = out(eye).float() - bias
    except RuntimeError as err:
        raise ValueError(f"the attention output projection of layer {layer} does not take {lm.n_heads} heads x "
                         f"{lm.d_head} dims ({err}): no per-head decomposition") from None
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(lm.device, lm.dtype)
    expected = probe.float() @ matrix + bias
    if not torch.allclose(out(probe).float(), expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()) + 1e-5):
        raise ValueError(f"the attention output projection of layer {layer} ({type(out).__name__}) is not affine: "
                         "no per-head decomposition")
    return OutputProjection(matrix.reshape(lm.n_heads, lm.d_head, -1), bias)


def head_results(z: torch.Tensor, projection: OutputProjection) -> torch.Tensor:
    """``[batch, pos, n_heads, d_model]``: each head's ``z [batch, pos, n_heads, d_head]`` through its slice of
    ``W_O`` (the bias belongs to no head)."""
    return torch.einsum("bphd,hdm->bphm", z.float(), projection.weight)


@torch.inference_mode()
def all_head_results(lm: LoadedModel, input_ids: torch.Tensor,
                     projections: list[OutputProjection] | None = None) -> torch.Tensor:
    """``[batch, pos, n_layers, n_heads, d_model]``: every head's output for ``input_ids [batch, pos]``."""
    projections = projections or [output_projection(lm, layer) for layer in range(lm.n_layers)]
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(lm.n_layers)]
    zs = lm.capture(input_ids, names)
    return torch.stack([head_results(zs[n], p) for n, p in zip(names, projections, strict=True)], dim=2)
