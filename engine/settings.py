"""Every ``SAESCOPE_*`` environment variable saescope reads, in one place, each with a typed getter.

Modules never read ``os.environ`` for a ``SAESCOPE_*`` name themselves: they call ``settings.get(settings.X)``,
so each name is spelled once, its type and default are declared once, and ``saescope info --settings`` (and
docs/settings in the README's index) can list them all. Values are read at each call: a test or a parent process
(``saescope serve`` sets some for the app server) may change them between calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, overload

T = TypeVar("T", str, float, int, bool, Path)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: its name, its type, its default (``None``: unset means "not configured"), and
    what it does."""

    name: str
    kind: type[T]
    default: T | None
    doc: str
    secret: bool = False
    """Never printed (an API key)."""

    def parse(self, raw: str) -> T:
        text = raw.strip()
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True  # pyright: ignore[reportReturnType]
            if text.lower() in _FALSE:
                return False  # pyright: ignore[reportReturnType]
            raise ValueError(f"${self.name} is {raw!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")
        if self.kind is Path:
            return Path(text).expanduser()  # pyright: ignore[reportReturnType]
        try:
            return self.kind(text)
        except ValueError:
            raise ValueError(f"${self.name} is {raw!r}: expected a{'n' if self.kind is int else ''} "
                             f"{self.kind.__name__}") from None


REGISTRY: dict[str, Setting] = {}


def _declare(name: str, kind: type[T], default: T | None, doc: str, secret: bool = False) -> Setting[T]:
    if name in REGISTRY:
        raise RuntimeError(f"setting {name} declared twice")
    REGISTRY[name] = setting = Setting(name, kind, default, doc, secret)
    return setting


DATA_DIR = _declare("SAESCOPE_DATA_DIR", Path, None,
                    "Where demo assets live (models, corpus, runs, caches); default: the repository's data/.")
CACHE_DIR = _declare("SAESCOPE_CACHE_DIR", Path, None,
                     "Per-machine cache (the dtype benchmark's answer); default: $XDG_CACHE_HOME/saescope or "
                     "~/.cache/saescope.")
RUN = _declare("SAESCOPE_RUN", Path, None,
               "The run directory, or a directory of runs, the app opens (saescope serve sets it).")
DEVICE = _declare("SAESCOPE_DEVICE", str, "auto", "Where the app's live pages run the model: auto, cpu, cuda, mps.")
DTYPE = _declare("SAESCOPE_DTYPE", str, "auto",
                 "The dtype the app's live pages load the model in: auto (the fastest here), float32, bfloat16...")
EMBEDDER = _declare("SAESCOPE_EMBEDDER", str, "",
                    "A sentence-embedding model folder for search by meaning; empty: all-MiniLM-L6-v2 from PyPI.")
EXPLAINER = _declare("SAESCOPE_EXPLAINER", str, "",
                     "The explainer behind the app's 'Explain this latent now': demo, a chat model folder or hub id, "
                     "or an OpenAI-compatible endpoint http://host:port/v1 (serve --explainer sets it).")
EXPLAINER_MODEL = _declare("SAESCOPE_EXPLAINER_MODEL", str, "", "The served model's name, for an endpoint explainer.")
EXPLAINER_KEY = _declare("SAESCOPE_EXPLAINER_KEY", str, "",
                         "The explainer endpoint's API key ($OPENAI_API_KEY is read when this is unset).", secret=True)
LLM_TOKEN = _declare("SAESCOPE_LLM_TOKEN", str, "", "The bearer token saescope llm-server requires (required beyond "
                     "loopback); clients send it when SAESCOPE_EXPLAINER_KEY is unset.", secret=True)
EXPLAINER_ALLOW_HTTP = _declare("SAESCOPE_EXPLAINER_ALLOW_HTTP", bool, False,
                                "Send an API key over plain http to a host that is not loopback.")
DUCKDB_MEMORY_LIMIT = _declare("SAESCOPE_DUCKDB_MEMORY_LIMIT", str, "",
                               "DuckDB's memory limit for a run's connection (e.g. 4GB); default 1GB.")
RELEASES = _declare("SAESCOPE_RELEASES", str, "",
                    "JSON files (os.pathsep-separated) of SAELens releases that add to or replace the shipped list.")
TOKEN = _declare("SAESCOPE_TOKEN", str, "", "The access token every browser session of the app must give once "
                 "(serve --token sets it; required beyond loopback).", secret=True)
READ_ONLY = _declare("SAESCOPE_READ_ONLY", bool, False, "The app writes nothing into runs (serve --read-only).")
SNAPSHOT_MIN_SECONDS = _declare("SAESCOPE_SNAPSHOT_MIN_SECONDS", float, 60.0,
                                "Seconds a pass must still have to go for a snapshot to be worth publishing.")


@overload
def get(setting: Setting[T], default: None = None) -> T | None: ...
@overload
def get(setting: Setting[T], default: T) -> T: ...
def get(setting: Setting[T], default: T | None = None) -> T | None:
    """The variable's value, parsed to its type; ``default`` (else the declared default) when unset or blank.
    A value that does not parse raises ``ValueError`` naming the variable."""
    raw = os.environ.get(setting.name, "")
    if not raw.strip():
        return default if default is not None else setting.default
    return setting.parse(raw)


def describe() -> list[tuple[str, str, str]]:
    """(name, current value or default, what it does) for every setting, for ``saescope info --settings``."""
    rows = []
    for s in REGISTRY.values():
        raw = os.environ.get(s.name)
        if raw is not None and raw.strip():
            value = "(set, hidden)" if s.secret else f"{raw.strip()} (set)"
        else:
            value = f"{s.default} (default)" if s.default not in (None, "") else "(unset)"
        rows.append((s.name, value, s.doc))
    return rows
