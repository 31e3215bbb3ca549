"""Reading SAEs from SAELens (v6 and pre-6) and EleutherAI sparsify directories. Safetensors only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .base import CFG_FILE, WEIGHTS_FILE, sae_class
from .config import SAEConfig

SPARSIFY_WEIGHTS = "sae.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_SPARSIFY_HOOK = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve_dir(path: Path) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load {path}: pickle checkpoints can run arbitrary code; saescope reads safetensors only")
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"SAE path {path} does not exist")
    return path


def _sparsify_hook_name(hookpoint: str) -> str:
    match = _SPARSIFY_HOOK.match(hookpoint)
    if match is None:
        return hookpoint
    layer, sub = match.groups()
    kind = {None: "hook_resid_post", "mlp": "hook_mlp_out"}.get(sub, "hook_attn_out")
    return f"blocks.{layer}.{kind}"


def _from_sparsify(
    raw: dict[str, Any], tensors: dict[str, torch.Tensor], hookpoint: str
) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in tensors:
            raise ValueError(f"sparsify SAE is missing tensor {key!r} (has {', '.join(sorted(tensors))})")
    if raw.get("transcode") or "W_skip" in tensors or raw.get("skip_connection"):
        raise ValueError("sparsify transcoders and skip connections are not supported (saescope reads plain SAEs)")
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {raw.get('activation')!r} is not supported (only 'topk')")
    if "k" not in raw:
        raise ValueError("sparsify cfg.json is missing required key 'k'")
    enc = tensors["encoder.weight"]
    cfg = SAEConfig(
        architecture="topk",
        d_in=int(raw.get("d_in") or enc.shape[1]),
        d_sae=int(enc.shape[0]),
        k=int(raw["k"]),
        hook_name=_sparsify_hook_name(hookpoint),
        dtype=str(enc.dtype).removeprefix("torch."),
        apply_b_dec_to_input=True,
        metadata={"source_format": "sparsify", "sparsify_hookpoint": hookpoint},
    )
    state = {"W_enc": enc.T.contiguous(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return cfg, state


def _legacy_architecture(raw: dict[str, Any]) -> tuple[str, int | None]:
    arch = raw.get("architecture", "standard")
    act = raw.get("activation_fn_str") or raw.get("activation_fn") or "relu"
    if arch == "standard" and act == "topk":
        k = (raw.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise ValueError("pre-6 SAELens topk config has no activation_fn_kwargs.k")
        return "topk", int(k)
    if arch == "standard" and act not in ("relu",):
        raise ValueError(f"unsupported pre-6 SAELens activation_fn_str {act!r} (supported: relu, topk)")
    return arch, raw.get("k")


def _from_saelens(raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    metadata = dict(raw.get("metadata") or {})
    # a transcoder's cfg.json names its input hook at the top level as well (saescope's, and SAELens' hook_name_out)
    is_v6 = "metadata" in raw and (("hook_name" not in raw and "hook_point" not in raw) or "hook_name_out" in raw)
    data = dict(raw)
    if is_v6:
        data["hook_name"] = metadata.pop("hook_name", "") or raw.get("hook_name") or ""
        data["model_name"] = metadata.pop("model_name", "") or ""
        data["hook_head_index"] = metadata.get("hook_head_index")  # kept in metadata too: see to_saelens_dict
    else:  # pre-6 flat config
        data["hook_name"] = raw.get("hook_name") or raw.get("hook_point") or ""
        data["hook_head_index"] = raw.get("hook_head_index", raw.get("hook_point_head_index"))
        data["architecture"], data["k"] = _legacy_architecture(raw)
        norm = raw.get("normalize_activations", "none")
        data["normalize_activations"] = {False: "none", True: "constant_norm_rescale", None: "none"}.get(norm, norm)
        metadata = {"source_format": "saelens<6"}
    if "architecture" not in data:
        data["architecture"] = "standard"
    for key in ("d_in",):
        if key not in data:
            raise ValueError(f"SAE cfg.json is missing required key {key!r}")
    if "d_sae" not in data:
        dec = tensors.get("W_dec")
        if dec is None:
            raise ValueError("SAE cfg.json has no 'd_sae' and the weights have no W_dec to infer it from")
        data["d_sae"] = int(dec.shape[0])
    data["metadata"] = metadata
    cls = sae_class(data["architecture"])  # fails early on unknown architectures
    cfg = SAEConfig.from_dict(data)
    state = dict(tensors)
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").exp()
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        state["W_dec"] = state["W_dec"] * scaling[:, None].to(state["W_dec"].dtype)
    if cls.architecture == "matching_pursuit":
        state.pop("W_enc", None)
    return cfg, state


def read_folder(path: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the SAE in an SAELens (v6 or pre-6) or sparsify folder (or a file in one);
    safetensors only."""
    folder = _resolve_dir(Path(path))
    cfg_path = folder / CFG_FILE
    if (folder / SPARSIFY_WEIGHTS).is_file():
        if not cfg_path.is_file():
            raise ValueError(f"sparsify SAE directory {folder} has no cfg.json")
        cfg, state = _from_sparsify(_read_json(cfg_path), _read_tensors(folder / SPARSIFY_WEIGHTS), folder.name)
    elif (folder / WEIGHTS_FILE).is_file():
        if not cfg_path.is_file():
            raise ValueError(f"SAE directory {folder} has {WEIGHTS_FILE} but no cfg.json")
        cfg, state = _from_saelens(_read_json(cfg_path), _read_tensors(folder / WEIGHTS_FILE))
    else:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(f"refusing to load {pickles} in {folder}: saescope reads safetensors only (pickle can run code)")
        subdirs = sorted(p.name for p in folder.iterdir() if (p / SPARSIFY_WEIGHTS).is_file() or (p / WEIGHTS_FILE).is_file())
        if subdirs:
            raise ValueError(f"{folder} holds several SAEs; pass one of its sub-directories: {', '.join(subdirs)}")
        raise ValueError(f"no SAE found in {folder}: expected {WEIGHTS_FILE} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
    return cfg, state
