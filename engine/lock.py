"""One writer per output: an exclusive lock on a folder, held for as long as a command writes it.

``hold(folder, command)`` creates ``folder/.saescope.lock`` and takes an exclusive ``fcntl.flock`` on it (the
operating system releases it when the process ends, however it ends), then records its owner in it: host, pid,
start time and the command. A second writer fails at once with ``Locked``, whose message names the first one.
``hold(..., shared=True)`` takes a shared lock: commands that only *read* a run while writing their own output
(explain, evaluate, compare, export) hold the run shared, so a ``precompute --force`` cannot rewrite it under them,
while several readers still run side by side.

A writer that died on this host released its flock with it: the next writer takes the lock and replaces the stale
owner record (``Lock.recovered`` says whose it was). A writer on another host that died while holding a lock on a
network filesystem can leave it held by the server: ``saescope unlock FOLDER`` removes the lock file after checking
that no process on this host holds it (run it only when you know the other host's writer is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".saescope.lock"
_HELD: dict[Path, list] = {}
"""Locks this process holds: path -> [depth, shared]. A nested ``hold`` of a lock the process already holds
exclusively (``precompute --shards`` holding the run while its merge takes it again) only counts."""


class Locked(RuntimeError):
    """Another process holds the lock."""

    def __init__(self, folder: Path, owner: dict | None):
        self.folder, self.owner = folder, owner
        super().__init__(f"{folder} is being written by {describe(owner)}; wait for it to finish or stop it (if that "
                         f"writer is gone and ran on another host, `saescope unlock {folder}` removes the lock)")


def describe(owner: dict | None) -> str:
    if not owner:
        return "another saescope process (its owner record is not written yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"`{owner.get('command', 'saescope')}` (pid {owner.get('pid')} on host {owner.get('host')}, since "
            f"{since})")


def read_owner(folder: str | Path, name: str = LOCK_FILE) -> dict | None:
    """The owner record of ``folder``'s lock (the last writer's: it stays after that writer ends)."""
    return _read(Path(folder) / name)


def holder(folder: str | Path, name: str = LOCK_FILE) -> dict | None:
    """The owner record of the process writing ``folder`` now, or None when no process holds its lock."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path) or {}
    finally:
        os.close(fd)
    return None


def _owner_of_held(path: Path, wait: float = 2.0) -> dict | None:
    """The record of a lock found held: the holder writes it right after taking the lock, so a second writer that
    arrives in between waits (at most ``wait`` seconds) for it to name the first."""
    deadline = time.monotonic() + wait
    while (owner := _read(path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return owner


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
        owner = json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive_here(owner: dict | None) -> bool | None:
    """Whether the owner's process still runs (None: it ran on another host, so this host cannot tell)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


@dataclass
class Lock:
    folder: Path
    fd: int
    shared: bool
    recovered: dict | None
    """The owner record a dead writer left, when this lock replaced it."""


@contextlib.contextmanager
def hold(folder: str | Path, command: str | None = None, *, shared: bool = False, name: str = LOCK_FILE
         ) -> Iterator[Lock]:
    """Hold ``folder``'s lock ``name`` (created with the folder if missing) for the block; raises ``Locked`` at
    once if a writer (or, for an exclusive lock, any holder) has it. A shared hold of a missing folder holds
    nothing (and creates nothing)."""
    folder = Path(folder)
    if (shared and not folder.is_dir()) or (folder.exists() and not folder.is_dir()):
        yield Lock(folder, -1, shared, None)  # nothing there to protect: the command says what is wrong
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = path.resolve()
    held = _HELD.get(key)
    if held is not None and (not held[1] or shared):
        held[0] += 1
        try:
            yield Lock(folder, -1, shared, None)
        finally:
            held[0] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(folder, _owner_of_held(path)) from None
        previous = _read(path)
        recovered = previous if previous and _alive_here(previous) is False else None
        if not shared:
            owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "command": command or " ".join(["saescope", *sys.argv[1:]])}
            record = json.dumps(owner).encode()
            os.pwrite(fd, record, 0)  # then trimmed: the file is never empty while a writer holds it
            os.ftruncate(fd, len(record))
            os.fsync(fd)
        _HELD[key] = [1, shared]
        try:
            yield Lock(folder, fd, shared, recovered)
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the flock; the file (and its last owner record) stays, harmless


def unlock(folder: str | Path) -> dict | None:
    """Remove ``folder``'s lock file (for a writer that died on another host); refuses while a process holds it
    here or its owner still runs on this host. Returns the owner record removed."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    if not path.exists():
        return None
    owner = read_owner(folder)
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(folder, owner) from None
        if _alive_here(owner):
            raise Locked(folder, owner)
        path.unlink()
    finally:
        os.close(fd)
    return owner
