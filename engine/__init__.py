"""saescope engine: models, hook points, SAEs, precompute, store and steering. Never imports Streamlit."""

from .families import supported_model_types
from .interventions import add_vector, check_sae_fits, clamp_latents, splice_sae, steering_vector
from .models import LoadedModel, from_module, load_model
from .precompute import precompute
from .saes import SAE, ForwardOutput, SAEConfig, architectures, build_sae, load_sae
from .store import RunStore

__all__ = [
    "SAE",
    "ForwardOutput",
    "LoadedModel",
    "RunStore",
    "SAEConfig",
    "add_vector",
    "architectures",
    "build_sae",
    "check_sae_fits",
    "clamp_latents",
    "from_module",
    "load_model",
    "load_sae",
    "precompute",
    "splice_sae",
    "steering_vector",
    "supported_model_types",
]
