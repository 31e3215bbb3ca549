"""The one way saescope writes a file or a folder that someone may read: aside, flushed, renamed, flushed again.

``write_file`` (and its ``write_bytes``/``write_text``/``write_json`` shorthands) write ``name`` as ``.name.tmp-*``
beside it, ``fsync`` the file, ``rename`` it over ``name`` (atomic on POSIX) and ``fsync`` the directory, so after
a crash or a power loss the name holds the old content or the new one, never a mix and never an empty file that a
manifest already names. ``replace_dir`` does the same for a folder built aside: every file and the folder are
flushed, the old folder is renamed to ``.name.old-*``, the new one into place, then the old one is removed; a crash
between the two renames leaves the old folder recoverable under its ``.old`` name, which ``recover_dir`` (called by
``replace_dir`` and by readers that care) puts back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def aside(path: str | Path) -> Path:
    """A fresh name beside ``path`` to build it under (hidden, unique per call)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def write_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` creates the file at ``tmp``; it is then flushed and renamed over
    ``path``. On any error the temporary file is removed and ``path`` keeps its old content."""
    path = Path(path)
    tmp = aside(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, value: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under ``folder`` (the folder included)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(folder)


def old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{OLD_MARK}saved")


def recover_dir(path: str | Path) -> bool:
    """Put back a folder that a crash inside ``replace_dir`` left under its ``.old`` name; True if it did. Safe to
    call at any time: it acts only when the folder itself is missing."""
    path = Path(path)
    old = old_name(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        fsync_dir(path.parent)
        return True
    if path.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)  # the swap finished; only the clean-up was cut short
    return False


def replace_dir(built: str | Path, path: str | Path) -> Path:
    """Move the folder ``built`` (complete, beside ``path``) into place as ``path``, replacing any folder there,
    so that ``path`` is never a mix of the two and is at no moment lost."""
    built, path = Path(built), Path(path)
    recover_dir(path)
    fsync_tree(built)
    old = old_name(path)
    if path.exists():
        os.replace(path, old)
    os.replace(built, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


@contextlib.contextmanager
def build_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder aside and move it into place as ``path`` when the block ends without an error (removed
    otherwise): ``with build_dir(out) as tmp: write files into tmp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(path)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Files and folders ``write_file``/``build_dir`` left in ``folder`` when their writer died."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARK in p.name)


def remove_stale(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove what killed writers left in ``folder`` (of ``names`` only, if given); call it only while holding the
    lock of what is written there, so no live writer's temporary file is taken. Returns what was removed."""
    removed = []
    for path in stale_temporaries(folder):
        if names is None or any(path.name.startswith(f".{n}{TMP_MARK}") for n in names):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed
