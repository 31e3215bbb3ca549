"""``load_sae``: one entry point for every SAE source. A folder (SAELens v6 or pre-6, sparsify) is read by
``folder``, a SAELens release by ``releases``; each reader returns ``(cfg, state)`` (the SAELens way) and
``build.build_sae`` checks and instantiates it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import parse_dtype
from . import releases
from .base import SAE
from .build import build_sae
from .folder import PICKLE_SUFFIXES, read_folder
from .transcoders import CLT_MARKER, is_circuit_tracer_file, read_circuit_tracer


def load_sae(
    path: str | Path, *, sae_id: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> SAE:
    """Load an SAE from an SAELens (v6 or pre-6) or sparsify directory, or a circuit-tracer transcoder file
    (``layer_L.safetensors``, as a transcoder SAE); safetensors only. A path that does not
    exist may be ``RELEASE/SAE_ID`` of a SAELens release, or pass the release as ``path`` with ``sae_id`` (``releases``).

    ``dtype=None`` keeps the stored dtype, except that fp16 weights are computed in fp32 on the CPU.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if sae_id is not None or (not Path(path).exists() and Path(path).suffix not in PICKLE_SUFFIXES):
        found = (str(path), sae_id) if sae_id is not None else releases.parse_release(str(path))
        if found is None:
            raise FileNotFoundError(releases.unknown_path_message(str(path)))
        return releases.load_release_sae(*found, device=device, dtype=dtype)
    if (Path(path) / CLT_MARKER).is_file():
        raise ValueError(f"{path} holds a cross-layer transcoder (circuit-tracer's layout): its features read one layer "
                         "and write to every later one, which precompute and the app do not support yet")
    if Path(path).is_file() and is_circuit_tracer_file(path):
        return read_circuit_tracer(path).as_sae(dtype=dtype or torch.float32).to(device)
    cfg, state = read_folder(path)
    if dtype is None and torch.device(device).type == "cpu" and state["W_dec"].dtype == torch.float16:
        dtype = torch.float32  # fp16 matmuls are ~25x slower than fp32 on CPUs; compute in fp32 unless asked
    return build_sae(cfg, state, device=device, dtype=dtype)
