"""A run directory's life: identity checks, a private staging folder, snapshots, the final swap.

Files are written into ``<run>/.partial/`` and moved into place only at the end, after the old
manifest (if any) is removed; ``manifest.json`` is written last, atomically. A run killed at any
point therefore leaves no manifest (or the previous complete run or snapshot untouched), and a rerun
into the same directory starts over cleanly.

While a long run computes, it publishes **snapshots**: complete, valid runs of the tokens seen so far,
each in its own folder ``<run>/.snapshots/<n>/`` with every file and its own index. The top-level
``manifest.json`` is the pointer: its ``data_dir`` names the snapshot folder, and replacing the manifest
(one atomic rename) moves every reader to the next snapshot at once. A reader therefore never mixes files of
two snapshots. The previous snapshot folder is kept (a reader that opened it a moment ago can still read its
files); older ones are removed. The finished run's files live at the top level (``data_dir`` absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import atomic
from ..lock import LOCK_FILE
from . import schema
from .manifest import sections

if TYPE_CHECKING:
    from ..model.loading import LoadedModel
    from ..saes import SAE

PARTIAL = ".partial"
SNAPSHOTS = ".snapshots"
SHARDS = ".shards"
"""A sharded precompute's job and task states (``precompute.shards``), kept until its merge has put the run in place."""
RUN_FILES = (
    schema.FEATURES, schema.EXAMPLES, schema.CONTEXTS, schema.VOCAB, schema.TOKENS, schema.ATTRIBUTION, schema.DARK_MATTER,
    schema.INDEX,
)


def fingerprint(config: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """SHA-256 (16 hex digits) of a config and, per tensor, its name, shape and a strided sample of values.

    Sampling keeps this fast for multi-GB models; values are hashed as bfloat16 so the same weights
    loaded in another dtype usually hash alike.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.bfloat16).view(torch.int16).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(lm: LoadedModel) -> str:
    """Fingerprint of a loaded model's config and weights."""
    config = lm.config.to_dict()
    for key in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        config.pop(key, None)
    return fingerprint(config, lm.model.named_parameters())


def sae_fingerprint(sae: SAE) -> str:
    """Fingerprint of an SAE's config and weights."""
    config = {k: v for k, v in sae.cfg.to_saelens_dict().items() if k not in ("dtype", "device")}
    return fingerprint(config, sae.named_parameters())


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's manifest, or None when the directory holds no complete run."""
    path = Path(run_dir) / schema.MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def prepare(out: str | Path, *, model_hash: str, sae_hash: str, force: bool) -> Path:
    """Check ``out`` may take this run, and return a fresh staging folder inside it.

    Refused without ``force``: a complete run of another model or SAE, or a directory holding
    files that are not a saescope run. A run without manifest (killed) is simply started over.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"run directory {out} exists and is not a directory")
    if out.is_dir() and not force:
        manifest = read_manifest(out)
        if manifest is not None:
            old_model, old_sae = manifest.get("model", {}), manifest.get("sae", {})
            if old_model.get("hash") != model_hash or old_sae.get("hash") != sae_hash:
                raise FileExistsError(
                    f"run directory {out} holds a run of model {old_model.get('name')!r} with SAE "
                    f"{old_sae.get('path') or old_sae.get('hash')!r}, not this model and SAE; "
                    "pass --force (force=True) to replace it, or choose another --out"
                )
        else:
            known = (*RUN_FILES, PARTIAL, SNAPSHOTS, SHARDS, schema.MANIFEST, LOCK_FILE, schema.STALE, *schema.DERIVED)
            foreign = sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.startswith(".saescope"))
            if foreign:
                raise FileExistsError(
                    f"run directory {out} holds files that are not a saescope run ({', '.join(foreign[:5])}); "
                    "pass --force (force=True) to write the run there anyway, or choose another --out"
                )
    staging = out / PARTIAL
    if out.is_dir():
        atomic.remove_stale(out)  # a killed writer's (precompute holds the run's lock)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def is_run(path: Path) -> bool:
    """A run directory: one with a manifest (finished, or a snapshot), or one a precompute is writing."""
    return (path / schema.MANIFEST).is_file() or (path / PARTIAL).is_dir()


def data_dir(run_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """The folder holding the files of the run (or snapshot) that ``manifest`` describes."""
    rel = manifest.get("data_dir") or "."
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"manifest of {run_dir} names data_dir {rel!r}, which is not a folder inside the run")
    return Path(run_dir) / path


def writer_identity() -> dict[str, str | int]:
    """Who is writing a run: host and process id (so readers can tell a live run from an abandoned one)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def writer_alive(manifest: Mapping[str, Any]) -> bool | None:
    """Whether the process that published this snapshot still runs: True/False on its own host, None elsewhere
    (e.g. a run written on a GPU node into a shared folder), and False for a complete run."""
    snap = sections(manifest).snapshot
    if snap.final:
        return False
    if snap.host != socket.gethostname():
        return None
    try:
        os.kill(int(snap.pid if snap.pid is not None else -1), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True if isinstance(snap.pid, int) else None
    return True


def snapshot_dir(out: str | Path, index: int) -> Path:
    """A fresh folder for snapshot number ``index`` of the run in ``out``."""
    path = Path(out) / SNAPSHOTS / f"{index:04d}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def identity(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a run's latents and examples depend on: model, SAE, corpus and settings (their fingerprints)."""
    if manifest is None:
        return None
    return sections(manifest).identity()


def set_aside_stale(out: Path, current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Path | None:
    """Move what was derived from the run in ``out`` (explanations, scores, evaluation, comparisons) out of the way
    when the run is being replaced by one of another identity; returns where it went (None: nothing to move)."""
    if current is None or identity(current) == identity(new):
        return None
    found = [out / name for name in schema.DERIVED if (out / name).exists()]
    if not found:
        return None
    old = sections(current)
    dest = out / schema.STALE / f"{old.sae.hash or 'unknown'}-{old.corpus.hash or 'unknown'}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in found:
        target = dest / path.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(path, target)
    atomic.fsync_dir(out)
    print(f"saescope: {out} now holds a run of another model, SAE, corpus or settings; what was derived from the "
          f"old one ({', '.join(p.name for p in found)}) no longer describes its latents and was moved to {dest}",
          file=sys.stderr, flush=True)
    return dest


def publish_snapshot(out: str | Path, folder: Path, manifest: Mapping[str, Any]) -> None:
    """Point the run's manifest at the complete snapshot in ``folder`` (atomically), then drop all but the
    previous snapshot folder."""
    out = Path(out)
    current = _current_manifest(out)
    set_aside_stale(out, current, manifest)
    atomic.fsync_tree(folder)  # the files first: a manifest must never name files still in the page cache only
    _write_manifest(out, {**manifest, "data_dir": folder.relative_to(out).as_posix()})
    previous = data_dir(out, current).resolve() if current is not None else None
    for old in sorted((out / SNAPSHOTS).iterdir()):
        if old.resolve() not in (folder.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)


def finalize(out: str | Path, staging: Path, manifest: Mapping[str, Any]) -> None:
    """Move the staged files into ``out`` (old run files removed) and write the manifest last; then remove the
    snapshots. While a snapshot is published readers use its folder, so the top-level files can be replaced
    under the manifest; a manifest describing top-level files is removed first."""
    out = Path(out)
    current = _current_manifest(out)
    set_aside_stale(out, current, manifest)
    if current is None or data_dir(out, current).resolve() == out.resolve():
        (out / schema.MANIFEST).unlink(missing_ok=True)
    for name in RUN_FILES:
        if not (staging / name).exists():
            (out / name).unlink(missing_ok=True)
    atomic.fsync_tree(staging)
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    atomic.fsync_dir(out)
    _write_manifest(out, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / SNAPSHOTS, ignore_errors=True)


def rewrite_manifest(out: str | Path, manifest: Mapping[str, Any]) -> None:
    """Replace a finished run's manifest (atomically) with ``manifest``, e.g. one with more sections."""
    _write_manifest(Path(out), manifest)


def _current_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(out)
        if manifest is not None:
            data_dir(out, manifest)
        return manifest
    except ValueError:  # unreadable: treated as absent (and replaced)
        return None


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(_finite(manifest), indent=2, default=_json_default, allow_nan=False)
    atomic.write_text(out / schema.MANIFEST, text)


def _finite(value: object) -> object:
    """NaN and infinities (e.g. R^2 with no held-out tokens) become null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")
