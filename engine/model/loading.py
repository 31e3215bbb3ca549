"""Loading a Hugging Face causal LM (local directory, hub id, or GGUF) with its hook points."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..dtypes import DTYPES
from .families import Family, decoder_layers, family_for, first_path, parse_hook_name
from .hooks import HookManager, StopForward, interventions
from .machine import DtypeChoice, choose_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is checked to exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, width: int = 576) -> torch.dtype:
    """``auto``: the fastest dtype on ``device`` for a model of ``width`` (``engine.machine.choose_dtype``:
    bf16 on CUDA, fp16 on MPS, and on a CPU whichever of fp32 and bf16 a cached micro-benchmark finds faster)."""
    return dtype_choice(dtype, device, width).torch_dtype


def dtype_choice(dtype: str | torch.dtype, device: torch.device, width: int = 576) -> DtypeChoice:
    """The dtype a ``--dtype`` value means on ``device``, and why (``auto`` measured, anything else as asked)."""
    if isinstance(dtype, torch.dtype):
        return DtypeChoice(str(dtype).removeprefix("torch."), "asked for", "user")
    if dtype == "auto":
        return choose_dtype(device, width)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DtypeChoice(str(DTYPES[dtype]).removeprefix("torch."), "asked for", "user")


@dataclass
class LoadedModel:
    """A causal LM ready for hooked forwards. Safe to share between threads for inference."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    name: str
    family: Family
    dtype_choice: DtypeChoice | None = None
    """How the dtype was chosen (``auto``: measured on this machine), when ``load_model`` chose it."""
    hooks: HookManager = field(init=False)

    def __post_init__(self) -> None:
        self.hooks = HookManager(self.model, self.family, self.n_layers, self.n_heads)

    @property
    def hf_model(self) -> PreTrainedModel:
        """``model`` typed as the Hugging Face causal LM it is (both constructors read its ``config.model_type``)."""
        return cast("PreTrainedModel", self.model)

    # --- shape facts -------------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.hf_model.config

    @cached_property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model, self.family))

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_head(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int:
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, key, None)
            if value:
                return int(value)
        return 2048

    def hook_points(self) -> list[str]:
        """Valid hook point names, in forward order."""
        return self.hooks.names()

    def hook_width(self, hook_name: str) -> int:
        """Width of the flat activation at ``hook_name`` (``n_heads * d_head`` for ``attn.hook_z``)."""
        self.hooks.check(hook_name)
        _, kind = parse_hook_name(hook_name)
        return self.n_heads * self.d_head if kind == "attn.hook_z" else self.d_model

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """BOS/EOS/PAD and other added special tokens (excluded from statistics by default)."""
        tok = self.tokenizer
        ids = set(getattr(tok, "all_special_ids", []) or [])
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, attr, None)
            if isinstance(value, int):
                ids.add(value)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # --- unembedding -------------------------------------------------------------
    def final_norm(self) -> nn.Module:
        return first_path(self.model, self.family.final_norm, "final norm")

    def unembed_matrix(self) -> torch.Tensor:
        """``W_U`` as ``[vocab, d_model]`` (the LM head weight)."""
        head = self.hf_model.get_output_embeddings()
        assert head is not None, f"{self.name} has no LM head"
        return head.weight

    def final_norm_scale(self) -> torch.Tensor:
        """Elementwise scale the final norm applies (Gemma stores ``w`` and scales by ``1 + w``)."""
        weight = cast(torch.Tensor, self.final_norm().weight).detach().float()  # every family's final norm has a weight
        if self.family.norm_scale_plus_one:
            return 1.0 + weight
        return weight

    # --- forwards ------------------------------------------------------------------
    @torch.inference_mode()
    def capture(
        self,
        input_ids: torch.Tensor,
        hook_names: str | Sequence[str],
        *,
        attention_mask: torch.Tensor | None = None,
        stop_early: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Activations at ``hook_names`` for ``input_ids [batch, pos]``; stops once all are seen when ``stop_early``."""
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        store: dict[str, torch.Tensor] = {}

        def grab(name: str):
            def fn(act: torch.Tensor) -> None:
                store[name] = act.detach().clone()
                if stop_early and len(store) == len(names):
                    raise StopForward

            return fn

        with interventions(self.hooks, [(n, grab(n)) for n in names]):
            try:
                self.model(input_ids=input_ids.to(self.device), attention_mask=_to(attention_mask, self.device), use_cache=False)
            except StopForward:
                pass
        missing = [n for n in names if n not in store]
        if missing:
            raise RuntimeError(f"hook points {missing} were not reached by the forward pass")
        return store

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward; logits ``[batch, pos, vocab]`` (interventions active in this thread apply)."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=_to(attention_mask, self.device), use_cache=False)
        return out.logits


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _hub_error(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"could not load model {name!r}: it is not a local directory or file, and fetching it from the "
        f"Hugging Face hub failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "Check the id and your network, or pass a local path (saescope demo uses a bundled model offline)."
    )


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode or no DNS), or None if it may be."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"cannot resolve {host}: {err}"
    return None


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer from a local dir, a hub id, or a GGUF file, ready for hooks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    source = str(name_or_path)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        source, gguf_file = str(path.parent), path.name
        path = path.parent
    is_local = path.exists()
    if not is_local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if not is_local:
        reason = _hub_unreachable()
        if reason:
            raise _hub_error(source, OSError(f"offline: {reason}"))
    if is_local:
        kwargs["local_files_only"] = True
        if gguf_file and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {source}")
    if is_local and not gguf_file and not (path / "config.json").is_file():
        raise ValueError(f"{source!r} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        if is_local:
            raise ValueError(f"{source!r} is not a Hugging Face model directory (no usable config.json): {err}") from err
        raise _hub_error(source, err) from err
    family = family_for(config.model_type)
    choice = dtype_choice(dtype, dev, int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 576))
    torch_dtype = choice.torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        if is_local:
            raise ValueError(f"could not load the model in {source!r}: {err}") from err
        raise _hub_error(source, err) from err
    # transformers declares PreTrainedModel.to with functools.wraps(nn.Module.to), which pyright reads as unbound
    model.to(dev).eval().requires_grad_(False)  # pyright: ignore[reportArgumentType]
    name = source if not gguf_file else f"{source}/{gguf_file}"
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, name=name, family=family, dtype_choice=choice)


def from_module(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests) with saescope's hooks."""
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=next(model.parameters()).device,
        name=name,
        family=family_for(model.config.model_type),
    )
