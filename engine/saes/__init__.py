"""SAE architectures (one module each), the registry, and file formats."""

# imported for their @register side effect (the `as` form marks them as deliberate re-exports)
from . import feature_choice as feature_choice
from . import gated as gated
from . import gradient_topk as gradient_topk
from . import jumprelu as jumprelu
from . import matching_pursuit as matching_pursuit
from . import mutual_choice as mutual_choice
from . import standard as standard
from . import topk as topk
from . import transcoder_sae as transcoder_sae
from .base import SAE, EncoderAffine, ForwardOutput, architectures, register, sae_class
from .build import build_sae
from .config import SAEConfig
from .loading import load_sae

__all__ = [
    "SAE", "EncoderAffine", "SAEConfig", "ForwardOutput", "architectures", "build_sae", "load_sae", "register",
    "sae_class",
]
