"""saescope engine: models, hook points, SAEs, precompute, store and steering. Never imports Streamlit."""

from .families import supported_model_types
from .interventions import add_vector, check_sae_fits, clamp_latents, splice_sae, steering_vector
from .models import LoadedModel, from_module, load_model
from .saes import SAE, ForwardOutput, SAEConfig, architectures, build_sae, load_sae

__all__ = [
    "SAE",
    "ForwardOutput",
    "LoadedModel",
    "SAEConfig",
    "add_vector",
    "architectures",
    "build_sae",
    "check_sae_fits",
    "clamp_latents",
    "from_module",
    "load_model",
    "load_sae",
    "splice_sae",
    "steering_vector",
    "supported_model_types",
]
