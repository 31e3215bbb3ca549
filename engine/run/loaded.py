"""A run's model and SAE, loaded from where its manifest says and checked against the fingerprints it recorded.

Everything that computes on a finished run's weights (explain's silent contexts, evaluate, compare, a sharded
task and its merge, the app's live pages) loads them here, so a model or SAE that changed since the run was
computed is refused with one message instead of silently producing numbers for other weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..model.loading import LoadedModel, load_model
from ..saes import SAE, load_sae
from .manifest import sections
from .rundir import model_fingerprint, sae_fingerprint


class FingerprintMismatch(ValueError):
    """The weights loaded are not the ones a run (or a sharded job) was computed with."""


def local_path(source: str | Path) -> str:
    """``source`` as recorded in a manifest: an existing local path made absolute (a relative path would name
    another folder, or a hub id, once a server changes directory), anything else (a hub id) unchanged."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def model_source(manifest: Mapping[str, Any]) -> str:
    """Where the run's model comes from: its recorded local path, else its name (a hub id or an older manifest's
    path as typed)."""
    source = sections(manifest).model.source
    if not source:
        raise ValueError("the run's manifest does not say which model it was computed on")
    return str(source)


def sae_source(manifest: Mapping[str, Any]) -> str:
    path = sections(manifest).sae.path
    if not path:
        raise ValueError("the run's manifest does not say where its SAE is stored")
    return str(path)


def check_model(lm: LoadedModel, expected: str | None, what: str) -> None:
    """Refuse ``lm`` unless its fingerprint is ``expected`` (``None``: nothing was recorded, nothing to check)."""
    if expected and model_fingerprint(lm) != expected:
        raise FingerprintMismatch(f"the model {lm.name} is not the one {what} was computed on (its weights differ from "
                                  f"the fingerprint {expected} it recorded): recompute it, or load the model it names")


def check_sae(sae: SAE, expected: str | None, where: str, what: str) -> None:
    if expected and sae_fingerprint(sae) != expected:
        raise FingerprintMismatch(f"the SAE at {where} is not the one {what} was computed with (its weights changed "
                                  f"since; fingerprint {sae_fingerprint(sae)} != {expected}): recompute it")


def load_run_model(manifest: Mapping[str, Any], what: str, *, lm: LoadedModel | None = None, device: str = "auto",
                   dtype: str = "auto") -> LoadedModel:
    """The run's model (``lm`` if given), checked against the fingerprint the run recorded. ``what`` names the
    run in messages."""
    if lm is None:
        lm = load_model(model_source(manifest), device=device, dtype=dtype)
    check_model(lm, sections(manifest).model.hash, what)
    return lm


def load_run_sae(manifest: Mapping[str, Any], what: str, *, device: Any = "cpu") -> SAE:
    """The SAE the run's manifest names, checked against the fingerprint the run recorded."""
    path = sae_source(manifest)
    try:
        sae = load_sae(path, device=device)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the SAE of {what} is not at {path!r} (the path its manifest records): {err}") from err
    check_sae(sae, sections(manifest).sae.hash, path, what)
    return sae
