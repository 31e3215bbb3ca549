"""Transcoders: sparse dictionaries that read one hook and write another (a per-layer transcoder reads an MLP's
input, ``blocks.L.ln2.hook_normalized``, and predicts its output, ``blocks.L.hook_mlp_out``), and sets of them, one per
layer, as attribution graphs use them (docs/graphs.md).

``y_hat = act(x @ W_enc + b_enc) @ W_dec + b_dec (+ x @ W_skip.T)``, with ``act`` one of ReLU, TopK (``k``) or
JumpReLU (``threshold``). Two file formats are read:

* **SAELens** (v6): a folder with ``cfg.json`` (``architecture`` ``transcoder`` | ``skip_transcoder`` |
  ``jumprelu_transcoder``, ``d_in``, ``d_sae``, ``d_out``, ``hook_name``, ``hook_name_out``) and
  ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
  ``W_skip [d_out, d_in]``, ``threshold``). SAELens has no TopK transcoder; saescope writes one as architecture
  ``topk_transcoder`` with ``k`` in ``cfg.json`` (the only extension).
* **circuit-tracer** per-layer files: ``layer_{L}.safetensors`` with ``W_enc [d_sae, d_model]`` (transposed),
  ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, optional ``W_skip [d_model, d_model]``,
  ``activation_function.threshold`` (JumpReLU) or ``k`` (TopK), else ReLU.

A set is a folder of per-layer SAELens folders (any names; each names its layer through ``hook_name``) or of
circuit-tracer ``layer_{L}.safetensors`` files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import atomic
from .base import SAE
from .build import build_sae
from .config import SAEConfig

ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "topk_transcoder")
INPUT_HOOK = "ln2.hook_normalized"
OUTPUT_HOOK = "hook_mlp_out"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_CT_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
CLT_MARKER = "W_enc_0.safetensors"
"""The file that marks a folder in circuit-tracer's cross-layer transcoder layout (``clt``)."""


@dataclass
class Transcoder:
    """One transcoder's weights (float32 on load unless asked otherwise) and where it reads and writes."""

    W_enc: torch.Tensor
    """``[d_in, d_sae]``."""
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    """``[d_sae, d_out]``."""
    b_dec: torch.Tensor
    hook_in: str
    hook_out: str
    k: int | None = None
    """TopK: latents kept per token."""
    threshold: torch.Tensor | None = None
    """JumpReLU: per-latent thresholds on the pre-activation."""
    W_skip: torch.Tensor | None = None
    """``[d_out, d_in]``: a linear skip path from input to output."""
    metadata: dict[str, object] = field(default_factory=dict[str, object])

    def __post_init__(self) -> None:
        d_in, d_sae = self.W_enc.shape
        if self.W_dec.shape[0] != d_sae or self.b_enc.shape != (d_sae,) or self.b_dec.shape != (self.W_dec.shape[1],):
            raise ValueError(f"transcoder at {self.hook_in}: inconsistent shapes W_enc {tuple(self.W_enc.shape)}, b_enc "
                             f"{tuple(self.b_enc.shape)}, W_dec {tuple(self.W_dec.shape)}, b_dec {tuple(self.b_dec.shape)}")
        if self.W_skip is not None and self.W_skip.shape != (self.d_out, d_in):
            raise ValueError(f"transcoder at {self.hook_in}: W_skip is {tuple(self.W_skip.shape)}, expected "
                             f"{(self.d_out, d_in)}")
        if self.k is not None and not 0 < self.k <= d_sae:
            raise ValueError(f"transcoder at {self.hook_in}: k={self.k} must be in 1..{d_sae}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"transcoder at {self.hook_in}: {name} holds NaN or Inf values")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def layer(self) -> int:
        match = _LAYER.match(self.hook_in)
        if match is None:
            raise ValueError(f"transcoder input hook {self.hook_in!r} names no layer")
        return int(match.group(1))

    @property
    def architecture(self) -> str:
        if self.k is not None:
            return "topk_transcoder"
        if self.threshold is not None:
            return "jumprelu_transcoder"
        return "skip_transcoder" if self.W_skip is not None else "transcoder"

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The codes from pre-activations: TopK, JumpReLU or ReLU."""
        if self.k is not None:
            values, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, values.relu())
        if self.threshold is not None:
            return pre * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre(x))

    def decode(self, codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        out = codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder decodes with its input: pass x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction of the output hook, codes) for ``x [..., d_in]``."""
        codes = self.encode(x)
        return self.decode(codes, x), codes

    def to(self, dtype: torch.dtype) -> Transcoder:
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return Transcoder(self.W_enc.to(dtype), self.b_enc.to(dtype), self.W_dec.to(dtype), self.b_dec.to(dtype),
                          self.hook_in, self.hook_out, self.k, cast(self.threshold), cast(self.W_skip), dict(self.metadata))

    def as_sae(self, dtype: torch.dtype | None = None) -> SAE:
        """The same transcoder as a registered SAE (``transcoder_sae``), as precompute, the lens and steering run it;
        a ValueError for a skip connection beside JumpReLU or TopK, which those architectures do not hold."""
        if self.W_skip is not None and self.architecture != "skip_transcoder":
            raise ValueError(f"transcoder at {self.hook_in}: a skip connection with a {self.architecture.split('_')[0]} "
                             "activation is not supported as an SAE (only ReLU skip transcoders)")
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            state["threshold"] = self.threshold
        if self.W_skip is not None:
            state["W_skip"] = self.W_skip
        cfg = SAEConfig(architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae, d_out=self.d_out,
                        hook_name=self.hook_in, hook_name_out=self.hook_out, k=self.k, apply_b_dec_to_input=False,
                        metadata=dict(self.metadata))
        return build_sae(cfg, state, dtype=dtype)

    # --- files ----------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16, model_name: str = "") -> Path:
        """An SAELens-format folder (``topk_transcoder`` for TopK), written aside and renamed into place."""
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out,
               "hook_name": self.hook_in, "hook_name_out": self.hook_out, "hook_layer_out": self.layer,
               "dtype": str(dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": False,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"model_name": model_name, "hook_name": self.hook_in, **self.metadata}}
        if self.k is not None:
            cfg["k"] = self.k

        folder = Path(folder)
        with atomic.build_dir(folder) as tmp:
            save_file({n: t.detach().to(dtype).contiguous().cpu() for n, t in tensors.items()},
                      str(tmp / "sae_weights.safetensors"))
            (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return folder


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_saelens(folder: str | Path, dtype: torch.dtype = torch.float32) -> Transcoder:
    """An SAELens-format transcoder folder."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no cfg.json (not an SAELens transcoder folder)") from None
    except ValueError as err:
        raise ValueError(f"{folder}/cfg.json is not valid JSON ({err})") from err
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{folder}: architecture {arch!r} is not a transcoder (one of {', '.join(ARCHITECTURES)})")
    t = read_tensors(folder / "sae_weights.safetensors")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in t]
    if arch == "jumprelu_transcoder" and "threshold" not in t:
        missing.append("threshold")
    if arch == "skip_transcoder" and "W_skip" not in t:
        missing.append("W_skip")
    if missing:
        raise ValueError(f"{folder}: sae_weights.safetensors lacks {', '.join(missing)}")
    hook_in = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name", "")
    hook_out = cfg.get("hook_name_out", "")
    if not hook_in or not hook_out:
        raise ValueError(f"{folder}: cfg.json must name hook_name (input) and hook_name_out (output)")
    def cast(name: str) -> torch.Tensor | None:
        return t[name].to(dtype) if name in t else None

    k = cfg.get("k") if arch == "topk_transcoder" else None
    if arch == "topk_transcoder" and not isinstance(k, int):
        raise ValueError(f"{folder}: a topk_transcoder needs an integer k in cfg.json")
    return Transcoder(t["W_enc"].to(dtype), t["b_enc"].to(dtype), t["W_dec"].to(dtype), t["b_dec"].to(dtype), hook_in,
                      hook_out, k, cast("threshold") if arch == "jumprelu_transcoder" else None, cast("W_skip"),
                      {k_: v for k_, v in cfg.get("metadata", {}).items() if k_ != "hook_name"})


def read_circuit_tracer(path: str | Path, layer: int | None = None, dtype: torch.dtype = torch.float32, *,
                        input_hook: str = INPUT_HOOK, output_hook: str = OUTPUT_HOOK) -> Transcoder:
    """One circuit-tracer ``layer_{L}.safetensors`` file (``layer`` from its name unless given)."""
    path = Path(path)
    if layer is None:
        match = _CT_FILE.match(path.name)
        if match is None:
            raise ValueError(f"{path.name}: circuit-tracer transcoder files are named layer_<L>.safetensors")
        layer = int(match.group(1))
    t = read_tensors(path)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in t]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}")
    k = int(t["k"].item()) if "k" in t else None
    threshold = t["activation_function.threshold"].to(dtype) if "activation_function.threshold" in t else None
    return Transcoder(t["W_enc"].T.contiguous().to(dtype), t["b_enc"].to(dtype), t["W_dec"].to(dtype), t["b_dec"].to(dtype),
                      f"blocks.{layer}.{input_hook}", f"blocks.{layer}.{output_hook}", k, threshold,
                      t["W_skip"].to(dtype) if "W_skip" in t else None)


def is_circuit_tracer_file(path: str | Path) -> bool:
    """A ``layer_L.safetensors`` file with no SAELens ``cfg.json`` beside it."""
    path = Path(path)
    return bool(_CT_FILE.match(path.name)) and not (path.parent / "cfg.json").is_file()


def write_circuit_tracer(tc: Transcoder, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``layer_{L}.safetensors`` in circuit-tracer's layout (``W_enc`` transposed to ``[d_sae, d_model]``)."""
    tensors = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip
    if tc.threshold is not None:
        tensors["activation_function.threshold"] = tc.threshold
    out = Path(folder) / f"layer_{tc.layer}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {n: v.detach().to(dtype).contiguous().cpu() for n, v in tensors.items()}
    if tc.k is not None:
        state["k"] = torch.tensor(tc.k)
    atomic.write_file(out, lambda tmp: save_file(state, str(tmp)))
    return out


def load_transcoders(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[int, Transcoder]:
    """Layer -> transcoder from a folder of per-layer SAELens folders or of circuit-tracer files (or one of either)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transcoders: {path} does not exist")
    if path.is_file():
        tc = read_circuit_tracer(path, dtype=dtype)
        return {tc.layer: tc}
    if (path / "cfg.json").is_file():
        tc = read_saelens(path, dtype)
        return {tc.layer: tc}
    if (path / CLT_MARKER).is_file():
        raise ValueError(f"{path} holds a cross-layer transcoder (circuit-tracer's layout), not per-layer "
                         "transcoders: saescope graph reads it (engine.saes.clt.load_clt); this tool needs per-layer ones")
    out: dict[int, Transcoder] = {}
    for child in sorted(path.iterdir()):
        if child.is_dir() and (child / "cfg.json").is_file():
            tc = read_saelens(child, dtype)
        elif child.is_file() and _CT_FILE.match(child.name):
            tc = read_circuit_tracer(child, dtype=dtype)
        else:
            continue
        if tc.layer in out:
            raise ValueError(f"{path}: two transcoders for layer {tc.layer} ({child.name} and another)")
        out[tc.layer] = tc
    if not out:
        raise ValueError(f"{path}: no transcoder found (per-layer SAELens folders with cfg.json, or circuit-tracer "
                         "layer_<L>.safetensors files)")
    return dict(sorted(out.items()))


def check_fits(transcoders: dict[int, Transcoder], hook_names: list[str], widths: dict[str, int]) -> None:
    """Refuse transcoders whose hooks the model lacks or whose widths differ from the model's (one line each)."""
    names = set(hook_names)
    for layer, tc in transcoders.items():
        for hook, d in ((tc.hook_in, tc.d_in), (tc.hook_out, tc.d_out)):
            if hook not in names:
                raise ValueError(f"transcoder of layer {layer} uses hook {hook!r}, which this model does not have")
            if widths[hook] != d:
                raise ValueError(f"transcoder of layer {layer}: {hook} is {widths[hook]} wide in this model, the "
                                 f"transcoder's is {d}")
