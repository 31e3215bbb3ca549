"""The dtype names saescope accepts, for models and SAEs alike."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
"""The dtype names saescope accepts (models and SAEs alike)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``name`` as a torch dtype; an unknown name raises ``ValueError`` listing the accepted ones."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
