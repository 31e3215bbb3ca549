"""Pretrained SAEs by SAELens release name: ``RELEASE/SAE_ID`` (``load_sae("RELEASE", sae_id=...)``).

``releases.json`` beside this file lists the releases saescope supports (from SAELens's ``pretrained_saes.yaml``;
regenerate with ``scripts/make_releases.py``): each release's hub repository, its model, its on-disk format, the
conventions saescope applies, and its SAE ids -> folders in the repository. A JSON file of the same shape named by
``$SAESCOPE_RELEASES`` (several: ``os.pathsep``-separated) adds releases or replaces listed ones.

Files come through ``huggingface_hub.hf_hub_download``, so they are cached, ``HF_HUB_CACHE``/``HF_HOME`` choose
the cache and ``HF_HUB_OFFLINE=1`` reads the cache only (both read at each call). Formats:

- ``saelens``: ``<folder>/cfg.json`` + ``<folder>/sae_weights.safetensors``, read by ``io.load_sae``.
- ``gemma_scope``: ``<folder>/params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``; read without
  pickle), a JumpReLU SAE with no ``b_dec`` subtracted from its input, hooked by the repository's kind (``-res``:
  ``hook_resid_post``, ``-mlp``: ``hook_mlp_out``, ``-att``: ``attn.hook_z``, heads flattened) at ``layer_N``.

Conventions: ``center_writing_weights`` (jbloom's GPT-2 SAEs were trained on TransformerLens residuals with the
writing weights centred, i.e. each activation minus its mean over ``d_model``): the centring is folded into the
encoder (``W_enc <- W_enc - mean_rows(W_enc)``; ``b_dec`` moved into ``b_enc``), so codes are exact on a Hugging
Face model's residual stream. ``cfg_overrides`` replace config fields (``normalize_activations``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from .. import settings
from .base import CFG_FILE, SAE, WEIGHTS_FILE
from .build import build_sae
from .config import SAEConfig
from .folder import read_folder

RELEASES_FILE = Path(__file__).with_name("releases.json")
ENV_FILES = settings.RELEASES.name
FORMATS = ("saelens", "gemma_scope")
_GEMMA_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


@dataclass(frozen=True)
class Release:
    """One release: where its SAEs live and how to read them."""

    name: str
    repo_id: str
    """Hugging Face repository holding the SAEs."""
    format: str
    """``saelens`` or ``gemma_scope``."""
    saes: dict[str, str]
    """SAE id -> folder inside the repository."""
    model: str = ""
    center_writing_weights: bool = False
    """Trained on TransformerLens residuals with centred writing weights: fold the centring into the encoder."""
    cfg_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"release {self.name!r}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if not self.repo_id or not self.saes:
            raise ValueError(f"release {self.name!r} needs a repo_id and at least one SAE")


def _read(path: Path) -> dict[str, Release]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the release list {path}: {err}") from err
    out = {}
    for name, entry in data.items():
        if name.startswith("_"):
            continue
        try:
            out[name] = Release(name=name, **entry)
        except TypeError as err:
            raise ValueError(f"release {name!r} in {path}: {err}") from err
    return out


def registry() -> dict[str, Release]:
    """Every known release: the shipped list, then the files named by ``$SAESCOPE_RELEASES`` over it."""
    releases = _read(RELEASES_FILE)
    for extra in filter(None, settings.get(settings.RELEASES, "").split(os.pathsep)):
        releases.update(_read(Path(extra)))
    return releases


def _close(word: str, choices: list[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def parse_release(text: str) -> tuple[str, str] | None:
    """``(release, sae_id)`` when ``text`` is ``RELEASE/SAE_ID`` of a known release, else None."""
    release, _, sae_id = str(text).partition("/")
    return (release, sae_id) if sae_id and release in registry() else None


def unknown_path_message(text: str) -> str:
    """Why ``text`` names no SAE: neither a folder nor a release, with the closest release names."""
    head = str(text).partition("/")[0]
    if not head or head.startswith((".", "~")) or Path(str(text)).is_absolute():
        return f"SAE path {text} does not exist"
    return f"SAE path {text} does not exist, and {head!r} is no known SAELens release{_close(head, sorted(registry()))}"


def resolve(release: str, sae_id: str) -> tuple[Release, str]:
    """The release and the folder of ``sae_id`` in its repository; ValueErrors name close matches."""
    releases = registry()
    if release not in releases:
        raise ValueError(f"unknown SAELens release {release!r}{_close(release, sorted(releases))} "
                         f"(saescope knows {len(releases)}: see engine/saes/releases.json; add one with ${ENV_FILES})")
    entry = releases[release]
    if sae_id not in entry.saes:
        ids = list(entry.saes)
        shown = _close(sae_id, ids) or f"; it has {len(ids)}, e.g. {', '.join(ids[:3])}"
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}{shown}")
    return entry, entry.saes[sae_id]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str, filename: str, *, cache_dir: str | Path | None = None) -> Path:
    """One file of a hub repository through the hub cache; a ValueError saying why when it cannot be had."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # the environment as it is now, or as huggingface_hub read it at import
    offline = _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    where = f"{filename} of {repo_id}"
    unreachable_why = None if offline else unreachable(endpoint)
    try:
        if unreachable_why is not None:  # huggingface_hub would retry for ~25 s: read the cache only, at once
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
            raise ValueError(f"cannot reach the Hugging Face hub at {endpoint} to download {where}, and it is not "
                             f"cached ({unreachable_why}); HF_HUB_CACHE names the cache, HF_ENDPOINT the hub")
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=offline, endpoint=endpoint,
                                    etag_timeout=10))
    except GatedRepoError as err:
        raise ValueError(f"{repo_id} is gated: accept its terms on the Hugging Face hub and log in (hf auth login) "
                         f"to download {filename}") from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ValueError(f"the Hugging Face hub has no repository {repo_id} (or it is private): {err}") from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise ValueError(f"{where} is not in the hub cache ({cache or 'the default cache'}) and HF_HUB_OFFLINE is "
                             "set: download it once online, or point HF_HUB_CACHE at a cache that has it") from err
        raise ValueError(f"cannot reach the Hugging Face hub to download {where}, and it is not cached "
                         f"({cause(err)})") from err
    except EntryNotFoundError as err:
        raise ValueError(f"{repo_id} has no file {filename}: the release list may be out of date") from err
    except (OSError, RuntimeError) as err:  # connection and HTTP errors
        raise ValueError(f"cannot download {where} from the Hugging Face hub: {cause(err)}") from err


def unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to the hub cannot be opened (None: it can, or a proxy is in the way and decides)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def cause(err: BaseException) -> str:
    """The innermost cause of an error, on one line."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:300]


def _gemma_scope(entry: Release, folder: str, params: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    match = re.search(r"layer_(\d+)", folder)
    if match is None:
        raise ValueError(f"Gemma Scope folder {folder!r} names no layer (embedding SAEs are not supported)")
    kind = next((k for k in _GEMMA_HOOKS if f"-{k}" in entry.repo_id), None)
    if kind is None:
        raise ValueError(f"cannot tell the hook of Gemma Scope repository {entry.repo_id!r} (expected -res, -mlp or -att)")
    try:
        with np.load(params, allow_pickle=False) as data:
            state = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.asarray(data[k], np.float32)) for k in data}
    except (OSError, ValueError) as err:
        raise ValueError(f"{params} is not a readable params.npz: {err}") from err
    missing = sorted({"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(state))
    if missing:
        raise ValueError(f"Gemma Scope params.npz lacks {missing} (has {sorted(state)})")
    d_in, d_sae = state["W_enc"].shape
    cfg = SAEConfig(
        architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), hook_name=f"blocks.{match.group(1)}.{_GEMMA_HOOKS[kind]}",
        apply_b_dec_to_input=False, reshape_activations="hook_z" if kind == "att" else "none", model_name=entry.model,
        metadata={"source_format": "gemma_scope"},
    )
    return cfg, {k: state[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}


def center_input(sae: SAE) -> SAE:
    """Fold "subtract each activation's mean over d_in" into the encoder (exact codes; see the module docstring)."""
    if sae.cfg.architecture not in ("standard", "topk", "jumprelu") or sae.cfg.normalize_activations != "none":
        raise ValueError(f"cannot fold centred inputs into a {sae.cfg.architecture} SAE with normalize_activations="
                         f"{sae.cfg.normalize_activations!r}")
    with torch.no_grad():
        W = sae.W_enc.double()
        b = sae.b_enc.double() - (sae.b_dec.double() @ W if sae.cfg.apply_b_dec_to_input else 0.0)
        sae.W_enc.copy_((W - W.mean(dim=0, keepdim=True)).to(sae.W_enc.dtype))
        sae.b_enc.copy_(b.to(sae.b_enc.dtype))
    sae.cfg = dataclasses.replace(sae.cfg, apply_b_dec_to_input=False,
                                  metadata={**sae.cfg.metadata, "center_writing_weights_folded": True})
    return sae


def load_release_sae(release: str, sae_id: str, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, cache_dir: str | Path | None = None) -> SAE:
    """Download (or read from the hub cache) and load SAE ``sae_id`` of SAELens release ``release``."""
    entry, folder = resolve(release, sae_id)
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    if entry.format == "saelens":
        cfg_path = download(entry.repo_id, f"{prefix}{CFG_FILE}", cache_dir=cache_dir)
        download(entry.repo_id, f"{prefix}{WEIGHTS_FILE}", cache_dir=cache_dir)
        cfg, state = read_folder(cfg_path.parent)
        sae = build_sae(cfg, state, dtype=torch.float32)
    else:
        cfg, state = _gemma_scope(entry, folder, download(entry.repo_id, f"{prefix}params.npz", cache_dir=cache_dir))
        sae = build_sae(cfg, state)
    overrides = {k: v for k, v in entry.cfg_overrides.items() if k in {f.name for f in dataclasses.fields(SAEConfig)}}
    if overrides:
        sae.cfg = dataclasses.replace(sae.cfg, **overrides)
    if entry.center_writing_weights:
        center_input(sae)
    sae.cfg.model_name = sae.cfg.model_name or entry.model
    sae.cfg.metadata = {**sae.cfg.metadata, "saelens_release": release, "saelens_sae_id": sae_id,
                        "hf_repo_id": entry.repo_id, "hf_folder": folder}
    sae = sae.to(device=device, dtype=dtype)
    sae.cfg.dtype = str(sae.dtype).removeprefix("torch.")
    return sae
