"""The manifest's sections as types: ``sections(manifest)`` instead of ``manifest.get("sae") or {}`` digs.

Every field may be missing in a manifest written by an older saescope (or a test's minimal one): such a field is
``None`` here, never a ``KeyError``. The manifest itself stays a plain JSON object on disk (docs/run-format.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

S = TypeVar("S")


@dataclass(frozen=True)
class ModelSection:
    name: str | None = None
    """As given (a hub id or a path as typed)."""
    path: str | None = None
    """The local folder, resolved (None for a hub model)."""
    hash: str | None = None
    family: str | None = None
    dtype: str | None = None
    device: str | None = None
    n_layers: int | None = None
    d_model: int | None = None
    vocab_size: int | None = None

    @property
    def source(self) -> str | None:
        """Where to load it from: the resolved folder, else the name."""
        return self.path or self.name


@dataclass(frozen=True)
class SaeSection:
    path: str | None = None
    hash: str | None = None
    architecture: str | None = None
    hook: str | None = None
    """The hook it reads (a transcoder's input)."""
    hook_in: str | None = None
    hook_out: str | None = None
    """The hook it writes (an SAE's own hook; a transcoder's output)."""
    transcoder: bool | None = None
    d_in: int | None = None
    d_out: int | None = None
    d_sae: int | None = None
    k: int | None = None
    compute_dtype: str | None = None
    hook_head_index: int | None = None

    @property
    def reads_writes(self) -> str | None:
        """``transcoder: reads X, writes Y`` for a transcoder run (None for an SAE's)."""
        if not self.transcoder or not self.hook_out:
            return None
        return f"transcoder: reads {self.hook_in or self.hook}, writes {self.hook_out}"


@dataclass(frozen=True)
class CorpusSection:
    path: str | None = None
    name: str | None = None
    hash: str | None = None
    n_contexts: int | None = None
    context_len: int | None = None
    n_tokens: int | None = None


@dataclass(frozen=True)
class SnapshotSection:
    final: bool = True
    """False while the run is still being computed (the manifest then describes a snapshot)."""
    index: int | None = None
    n_tokens: int | None = None
    seen_tokens: int | None = None
    target_tokens: int | None = None
    host: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class Sections:
    model: ModelSection
    sae: SaeSection
    corpus: CorpusSection
    snapshot: SnapshotSection
    settings: dict[str, Any] = field(default_factory=dict)
    """The run's ``PrecomputeConfig`` fields as recorded."""

    def identity(self) -> dict[str, Any]:
        """What the run's latents and examples depend on: model, SAE, corpus and settings."""
        return {"model": self.model.hash, "sae": self.sae.hash, "corpus": self.corpus.hash, "settings": self.settings}


def _section(cls: type[S], value: Any) -> S:
    names = {f.name for f in dataclasses.fields(cls)}  # pyright: ignore[reportArgumentType]
    data = value if isinstance(value, Mapping) else {}
    return cls(**{k: v for k, v in data.items() if k in names})


def sections(manifest: Mapping[str, Any] | None) -> Sections:
    """The typed sections of ``manifest`` (an empty one for None)."""
    manifest = manifest or {}
    snapshot = manifest.get("snapshot")
    return Sections(
        model=_section(ModelSection, manifest.get("model")),
        sae=_section(SaeSection, manifest.get("sae")),
        corpus=_section(CorpusSection, manifest.get("corpus")),
        snapshot=_section(SnapshotSection, snapshot) if isinstance(snapshot, Mapping) else SnapshotSection(),
        settings=dict(manifest.get("settings") or {}),
    )
