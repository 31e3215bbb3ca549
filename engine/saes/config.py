"""The SAE configuration shared by every architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")


def _is_index(value: object) -> bool:
    """A non-negative int (not a bool): what a config read from JSON must hold where an index is declared."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class SAEConfig:
    """What an SAE is; the fields SAELens v6 writes to ``cfg.json``, plus saescope's few extras."""

    architecture: str
    """Registry key: standard, topk, jumprelu, gated, matching_pursuit."""
    d_in: int
    """Width of the activation the SAE reads."""
    d_sae: int
    """Number of latents."""
    hook_name: str = ""
    """Hook point the SAE was trained on, e.g. ``blocks.15.hook_resid_post``."""
    dtype: str = "float32"
    """Storage dtype of the weights."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding."""
    normalize_activations: str = "none"
    """One of ``NORMALIZATIONS``; ``expected_average_only_in`` and ``covariance_whitening`` are folded into the weights,
    so identity at inference (as in SAELens)."""
    reshape_activations: str = "none"
    """``hook_z`` to flatten ``[..., n_heads, d_head]`` inputs."""
    hook_head_index: int | None = None
    """Per-head hooks (``attn.hook_z``): the one head the SAE reads, ``x[..., hook_head_index, :]`` of the
    ``[..., n_heads, d_head]`` activation, so ``d_in = d_head`` (SAELens v6 ``metadata.hook_head_index``)."""
    k: int | None = None
    """TopK: number of latents kept per token."""
    rescale_acts_by_decoder_norm: bool = False
    """TopK: select on ``pre * ||W_dec||`` and divide codes by ``||W_dec||`` before decoding."""
    residual_threshold: float = 1e-2
    """Matching pursuit: stop a token when its residual norm is below this."""
    max_iterations: int | None = None
    """Matching pursuit: most greedy steps (None = d_in). Adjustable at inference time."""
    stop_on_duplicate_support: bool = True
    """Matching pursuit: stop a token when a step adds no new latent."""
    model_name: str = ""
    """Model the SAE was trained on (metadata)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Other metadata carried through load/save untouched."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAE config field {name} must be a positive integer, got {value!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"unsupported normalize_activations {self.normalize_activations!r}; supported: {', '.join(NORMALIZATIONS)}"
            )
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"unsupported reshape_activations {self.reshape_activations!r}; supported: none, hook_z")
        if self.hook_head_index is not None:
            if not _is_index(self.hook_head_index):
                raise ValueError(f"hook_head_index must be a non-negative integer or None, got {self.hook_head_index!r}")
            if self.reshape_activations == "hook_z":
                raise ValueError(
                    f"hook_head_index={self.hook_head_index} (one head, d_in = d_head) contradicts reshape_activations="
                    "'hook_z' (all heads flattened); a config sets at most one of them"
                )
        if self.architecture == "topk":
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"topk SAE needs 0 < k <= d_sae={self.d_sae}, got k={self.k!r}")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1 or None, got {self.max_iterations!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring keys other tools write that saescope does not use."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_saelens_dict(self) -> dict[str, Any]:
        """The ``cfg.json`` SAELens v6 reads."""
        metadata = {**self.metadata, "hook_name": self.hook_name, "model_name": self.model_name}
        if self.hook_head_index is not None or "hook_head_index" in metadata:  # only then: run fingerprints stay put
            metadata["hook_head_index"] = self.hook_head_index
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            "metadata": metadata,
        }
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        if self.architecture == "matching_pursuit":
            out["residual_threshold"] = self.residual_threshold
            out["max_iterations"] = self.max_iterations
            out["stop_on_duplicate_support"] = self.stop_on_duplicate_support
        return out
