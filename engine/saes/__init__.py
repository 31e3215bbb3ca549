"""SAE architectures (one module each), the registry, and file formats."""

from . import gated, jumprelu, matching_pursuit, standard, topk  # noqa: F401  (register architectures)
from .base import SAE, EncoderAffine, ForwardOutput, architectures, register, sae_class
from .build import build_sae
from .config import SAEConfig
from .loading import load_sae

__all__ = [
    "SAE", "EncoderAffine", "SAEConfig", "ForwardOutput", "architectures", "build_sae", "load_sae", "register",
    "sae_class",
]
