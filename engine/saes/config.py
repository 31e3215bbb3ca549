"""The SAE configuration shared by every architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

K_ARCHITECTURES = ("topk", "gradient_topk", "feature_choice", "mutual_choice", "topk_transcoder")
"""Architectures whose config needs ``k``: latents per token (TopK, g-SAE) or the mean per token a batch rule spends
(feature and mutual choice, whose inference thresholds were estimated at that budget)."""

INFERENCE_RULES = {
    "gradient_topk": "TopK over z + gradient_beta * z * |W_dec grad_x L| where the next-token loss gradient is given "
                     "(teacher-forced); plain TopK over z where it is not (last position, generated tokens)",
    "feature_choice": "per-latent thresholds estimated on training batches stand in for each latent's top-m tokens "
                      "of a batch: a latent fires where its pre-activation exceeds its threshold",
    "mutual_choice": "one global threshold estimated on training batches stands in for the batch's top k*N "
                     "(token, latent) pairs: a latent fires where its pre-activation exceeds it",
}
"""How the batch-dependent or gradient-dependent encoders encode one token at inference (written to cfg.json)."""

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")


def _is_index(value: object) -> bool:
    """A non-negative int (not a bool): what a config read from JSON must hold where an index is declared."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class SAEConfig:
    """What an SAE is; the fields SAELens v6 writes to ``cfg.json``, plus saescope's few extras."""

    architecture: str
    """Registry key: standard, topk, jumprelu, gated, matching_pursuit, gradient_topk, feature_choice, mutual_choice."""
    d_in: int
    """Width of the activation the SAE reads."""
    d_sae: int
    """Number of latents."""
    hook_name: str = ""
    """Hook point the SAE was trained on, e.g. ``blocks.15.hook_resid_post``; a transcoder's input (the hook it reads)."""
    hook_name_out: str = ""
    """Transcoders: the hook point it writes (predicts), e.g. ``blocks.5.hook_mlp_out`` (SAELens'
    ``hook_name_out``); empty for an SAE, which writes where it reads."""
    d_out: int | None = None
    """Transcoders: width of the output hook (None: ``d_in``)."""
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
    """TopK and g-SAE: number of latents kept per token; feature/mutual choice: mean latents per token the batch
    rule spends (k*N per batch of N tokens)."""
    gradient_beta: float = 1.0
    """g-SAE: weight of the gradient term in the selection score ``z + beta * z * |W_dec grad_x L|``."""
    global_threshold: float | None = None
    """Mutual choice: the one inference threshold on pre-activations (estimated on training batches)."""
    matryoshka_widths: list[int] | None = None
    """Matryoshka SAEs: cumulative widths of the nested prefixes (strictly increasing, the last = d_sae); group g
    holds latents ``[widths[g-1], widths[g])``."""
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
        if self.d_out is not None and not (_is_index(self.d_out) and self.d_out > 0):  # read from JSON: any type
            raise ValueError(f"SAE config field d_out must be a positive integer or None, got {self.d_out!r}")
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
        if self.architecture in K_ARCHITECTURES:
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"{self.architecture} SAE needs 0 < k <= d_sae={self.d_sae}, got k={self.k!r}")
        if self.architecture == "mutual_choice" and self.global_threshold is None:
            raise ValueError("mutual_choice SAE config has no global_threshold: its inference rule (one threshold "
                             "estimated on training batches) is missing; the file was saved without it")
        if self.matryoshka_widths is not None:
            self._check_matryoshka(self.matryoshka_widths)
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1 or None, got {self.max_iterations!r}")

    def _check_matryoshka(self, widths: object) -> None:
        if not isinstance(widths, list) or not widths or not all(_is_index(w) and w > 0 for w in widths):
            raise ValueError(f"matryoshka_widths must be a non-empty list of positive integers, got {widths!r}")
        if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(f"matryoshka_widths must be strictly increasing, got {widths}")
        if widths[-1] != self.d_sae:
            raise ValueError(f"matryoshka groups must sum to d_sae={self.d_sae}: the cumulative widths {widths} end at "
                             f"{widths[-1]}")

    def matryoshka_groups(self) -> list[tuple[int, int]]:
        """``[start, end)`` latent ranges of the nested groups (one group spanning all latents if not Matryoshka)."""
        widths = self.matryoshka_widths or [self.d_sae]
        return list(zip([0, *widths[:-1]], widths, strict=True))

    @property
    def inference_rule(self) -> str | None:
        """How a batch- or gradient-dependent encoder encodes one token at inference (None for the others)."""
        return INFERENCE_RULES.get(self.architecture)

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
        if self.hook_name_out:  # transcoders only: a plain SAE's fingerprint stays put
            out.update(hook_name_out=self.hook_name_out, d_out=self.d_out or self.d_in)
        if self.architecture in K_ARCHITECTURES:
            out["k"] = self.k
        if self.architecture in ("topk", "gradient_topk"):
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        if self.architecture == "gradient_topk":
            out["gradient_beta"] = self.gradient_beta
        if self.architecture == "mutual_choice":
            out["global_threshold"] = self.global_threshold
        if self.inference_rule is not None:
            out["inference_rule"] = self.inference_rule
        if self.matryoshka_widths is not None:
            out["matryoshka_widths"] = list(self.matryoshka_widths)
        if self.architecture == "matching_pursuit":
            out["residual_threshold"] = self.residual_threshold
            out["max_iterations"] = self.max_iterations
            out["stop_on_duplicate_support"] = self.stop_on_duplicate_support
        return out
