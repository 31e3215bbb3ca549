"""Cross-layer transcoders (CLTs) in circuit-tracer's file layout: each layer's features read that layer's input hook
and write to the output hook of that layer *and every later one*.

A CLT folder holds, for ``i`` in ``0..n_layers-1`` (``n_layers`` = the number of ``W_enc_*`` files):

* ``W_enc_{i}.safetensors``: ``W_enc_{i} [d_sae, d_model]`` (circuit-tracer's orientation), ``b_enc_{i} [d_sae]``,
  ``b_dec_{i} [d_model]`` (the bias of layer i's *output*) and, for JumpReLU, ``threshold_{i} [d_sae]``;
* ``W_dec_{i}.safetensors``: ``W_dec_{i} [d_sae, n_layers - i, d_model]``, row ``[f, j]`` what feature ``f`` of layer
  ``i`` writes to the output of layer ``i + j``;
* optionally ``config.yaml`` (circuit-tracer's): ``model_kind: cross_layer_transcoder``, ``feature_input_hook``,
  ``feature_output_hook`` (TransformerLens names inside a block; circuit-tracer's defaults ``hook_resid_mid`` and
  ``hook_mlp_out``).

``codes_i = act(x_i @ W_enc_i.T + b_enc_i)`` with ``act`` ReLU or JumpReLU (``pre * (pre > threshold)``, as
circuit-tracer), and the output of layer ``L`` is ``sum_{i <= L} codes_i @ W_dec_i[:, L - i] + b_dec_L``.
circuit-tracer's ``to_safetensors`` writes no skip connection, so none is read; any other tensor is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .transcoders import CLT_MARKER, read_tensors

_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")
DEFAULT_INPUT_HOOK = "hook_resid_mid"
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"
_SAESCOPE_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "ln2.hook_normalized",
                   "attn.hook_z")


@dataclass
class CrossLayerTranscoder:
    """A CLT's weights (float32) and the hooks, inside each block, its features read and write."""

    W_enc: torch.Tensor
    """``[n_layers, d_model, d_sae]`` (saescope's orientation: ``x @ W_enc[i]``)."""
    b_enc: torch.Tensor
    """``[n_layers, d_sae]``."""
    W_dec: list[torch.Tensor]
    """``W_dec[i] [d_sae, n_layers - i, d_model]``."""
    b_dec: torch.Tensor
    """``[n_layers, d_model]``: the bias of each layer's output."""
    input_hook: str = DEFAULT_INPUT_HOOK
    output_hook: str = DEFAULT_OUTPUT_HOOK
    threshold: torch.Tensor | None = None
    """``[n_layers, d_sae]`` (JumpReLU), else ReLU."""

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[2]

    def hook_in(self, layer: int) -> str:
        return f"blocks.{layer}.{self.input_hook}"

    def hook_out(self, layer: int) -> str:
        return f"blocks.{layer}.{self.output_hook}"

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., d_sae]`` of layer ``layer``'s features from that layer's input ``x [..., d_model]``."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]
        if self.threshold is not None:
            return pre * (pre > self.threshold[layer])
        return pre.relu()

    def outputs(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """``[n_layers, ..., d_model]``: what the CLT writes to each layer's output hook, from every layer's codes
        ``codes[i] [..., d_sae]``: ``sum_{i <= L} codes[i] @ W_dec[i][:, L - i] + b_dec[L]``."""
        if len(codes) != self.n_layers:
            raise ValueError(f"a CLT of {self.n_layers} layers decodes the codes of every layer, got {len(codes)}")
        out = self.b_dec.reshape(self.n_layers, *([1] * (codes[0].ndim - 1)), self.d_model).expand(
            self.n_layers, *codes[0].shape[:-1], self.d_model).clone()
        for i, c in enumerate(codes):
            # [..., d_sae] x [d_sae, n_layers - i, d_model] -> [n_layers - i, ..., d_model]
            out[i:] += torch.einsum("...f,fjd->j...d", c.to(self.W_dec[i].dtype), self.W_dec[i])
        return out

    def forward(self, xs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every layer's output and codes from every layer's input ``xs [n_layers, ..., d_model]``."""
        codes = [self.encode(i, xs[i]) for i in range(self.n_layers)]
        return self.outputs(codes), codes


def is_clt_folder(path: str | Path) -> bool:
    """A folder in circuit-tracer's CLT layout (it holds ``W_enc_0.safetensors``)."""
    return (Path(path) / CLT_MARKER).is_file()


def _config_hooks(folder: Path) -> tuple[str, str]:
    path = folder / "config.yaml"
    if not path.is_file():
        return DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK
    import yaml  # transformers' dependency

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a mapping")
    kind = cfg.get("model_kind", "cross_layer_transcoder")
    if kind != "cross_layer_transcoder":
        raise ValueError(f"{path}: model_kind {kind!r} is not a cross-layer transcoder")
    hooks = (str(cfg.get("feature_input_hook", DEFAULT_INPUT_HOOK)), str(cfg.get("feature_output_hook", DEFAULT_OUTPUT_HOOK)))
    return hooks


def load_clt(folder: str | Path) -> CrossLayerTranscoder:
    """A CLT from a folder in circuit-tracer's layout (float32); a ValueError naming what is not understood."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cross-layer transcoder: {folder} is not a folder")
    layers = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ENC.match(p.name)))
    if not layers:
        raise ValueError(f"{folder}: no W_enc_<i>.safetensors (not a circuit-tracer cross-layer transcoder)")
    n = len(layers)
    if layers != list(range(n)):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise ValueError(f"{folder}: encoder files of layers {missing} are missing (layers must run 0..n-1)")
    W_enc, b_enc, b_dec, thresholds, W_dec = [], [], [], [], []
    for i in range(n):
        enc = read_tensors(folder / f"W_enc_{i}.safetensors")
        known = {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
        unknown = sorted(set(enc) - known)
        if unknown:
            raise ValueError(f"{folder}/W_enc_{i}.safetensors: tensors {unknown} are not part of circuit-tracer's CLT "
                             "layout as saescope reads it (W_enc_i, b_enc_i, b_dec_i, threshold_i)")
        lacking = sorted({f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"} - set(enc))
        if lacking:
            raise ValueError(f"{folder}/W_enc_{i}.safetensors lacks {', '.join(lacking)}")
        thresholds.append(enc.get(f"threshold_{i}"))
        dec_path = folder / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise ValueError(f"{folder}: W_dec_{i}.safetensors is missing")
        dec = read_tensors(dec_path)
        if set(dec) != {f"W_dec_{i}"}:
            raise ValueError(f"{dec_path}: expected the one tensor W_dec_{i}, found {sorted(dec)}")
        W_enc.append(enc[f"W_enc_{i}"].float())
        b_enc.append(enc[f"b_enc_{i}"].float())
        b_dec.append(enc[f"b_dec_{i}"].float())
        W_dec.append(dec[f"W_dec_{i}"].float())
    if len({t is None for t in thresholds}) > 1:
        raise ValueError(f"{folder}: some layers have a JumpReLU threshold and others do not")
    d_sae, d_model = W_enc[0].shape
    for i in range(n):
        want = {"W_enc": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,), "W_dec": (d_sae, n - i, d_model)}
        got = {"W_enc": W_enc[i].shape, "b_enc": b_enc[i].shape, "b_dec": b_dec[i].shape, "W_dec": W_dec[i].shape}
        if thresholds[i] is not None:
            want["threshold"], got["threshold"] = (d_sae,), thresholds[i].shape
        for name, shape in want.items():
            if tuple(got[name]) != shape:
                raise ValueError(f"{folder}: {name}_{i} is {tuple(got[name])}, expected {shape} (d_sae {d_sae}, d_model "
                                 f"{d_model}, {n} layers)")
    threshold = torch.stack([t.float() for t in thresholds]) if thresholds[0] is not None else None
    clt = CrossLayerTranscoder(torch.stack(W_enc).transpose(1, 2).contiguous(), torch.stack(b_enc), W_dec,
                               torch.stack(b_dec), *_config_hooks(folder), threshold=threshold)
    for name, t in (("W_enc", clt.W_enc), ("b_enc", clt.b_enc), ("b_dec", clt.b_dec), ("threshold", threshold),
                    *((f"W_dec_{i}", w) for i, w in enumerate(W_dec))):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{folder}: {name} holds NaN or Inf values")
    return clt


def check_clt_fits(clt: CrossLayerTranscoder, hook_names: list[str], widths: dict[str, int]) -> None:
    """Refuse a CLT whose hooks the model lacks (one line, saying which saescope has) or whose width differs."""
    names = set(hook_names)
    for layer in range(clt.n_layers):
        for hook in (clt.hook_in(layer), clt.hook_out(layer)):
            if hook not in names:
                kind = hook.split(".", 2)[2]
                hint = (" (the residual stream between attention and MLP: saescope has no hook there; "
                        "ln2.hook_normalized is the MLP's normalised input)" if kind == "hook_resid_mid" else "")
                raise ValueError(f"the cross-layer transcoder uses hook {hook!r}, which this model does not have"
                                 f"{hint}; saescope's hooks in a block: {', '.join(_SAESCOPE_HOOKS)}")
            if widths[hook] != clt.d_model:
                raise ValueError(f"the cross-layer transcoder is {clt.d_model} wide, {hook} is {widths[hook]}")
