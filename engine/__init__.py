"""saescope engine: models, hook points, SAEs, precompute, store and steering. Never imports Streamlit.

Subpackages: model/ (the LM), saes/, live/ (per-request work), precompute/, run/ (the on-disk contract), tools/
(serve, demo, bench); train.py and cli.py at the top.
"""

from .analysis.interventions import add_vector, check_sae_fits, clamp_latents, splice_sae, steering_vector
from .model.families import supported_model_types
from .model.loading import LoadedModel, from_module, load_model
from .precompute.pipeline import precompute
from .run.store import RunStore
from .saes import SAE, ForwardOutput, SAEConfig, architectures, build_sae, load_sae

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
