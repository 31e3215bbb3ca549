"""Write ``requirements/lock.txt``: every package saescope's install needs, pinned exactly with its files' hashes.

    python scripts/lock.py                 # refresh every pin to the newest release pyproject.toml allows (make lock)
    python scripts/lock.py --keep          # keep today's pins where they still fit (after editing pyproject.toml)
    python scripts/lock.py --oldest FILE   # the oldest releases the floors allow, for make test-oldest (no hashes)

uv resolves once for every platform and every Python from ``requires-python`` on (``--universal``: where they need
different versions the lock carries one pin per marker), so the same file serves Linux, macOS and Windows, and pip
installs it (``pip install --require-hashes --no-deps -r requirements/lock.txt``) without uv. The inputs are the
project's dependencies with every extra and the build backend (installed with ``--no-build-isolation`` so the build
is locked too). torch is resolved at exactly the Makefile's ``TORCH_VERSION`` but left out of the file, with the
packages only its CUDA builds pull (``nvidia-*``, ``cuda-*``, ``triton``): torch is installed apart, the CPU wheel
or a CUDA build from the index the user names, and the lock must force neither.

The header records a digest of the inputs; ``tests/test_lock.py`` fails when pyproject.toml changed without a new
lock, or when the two name different packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"

TORCH_ONLY = re.compile(r"^(torch|triton|pytorch-triton(-.*)?|nvidia-.*|cuda-.*)$")
"""Packages installed with torch, not from the lock: torch itself and the CUDA libraries its Linux wheels pull."""
DIGEST_LINE = "# inputs-sha256: "
TORCH_LINE = "# torch: "


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def torch_version() -> str:
    """The torch version the Makefile installs (``TORCH_VERSION ?= X``)."""
    match = re.search(r"^TORCH_VERSION \?= *(\S+)", MAKEFILE.read_text(), re.M)
    if match is None:
        raise SystemExit(f"no 'TORCH_VERSION ?= X' line in {MAKEFILE}")
    return match.group(1)


def build_requires(proj: dict | None = None) -> list[str]:
    return list((proj or project())["build-system"]["requires"])


def inputs_digest(proj: dict | None = None) -> str:
    """A digest of everything the lock is resolved from: Python range, dependencies, extras, build backend, torch."""
    proj = proj or project()
    inputs = {
        "requires-python": proj["project"].get("requires-python"),
        "dependencies": sorted(proj["project"].get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in sorted(proj["project"].get("optional-dependencies", {}).items())},
        "build-system": sorted(build_requires(proj)),
        "torch": torch_version(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def uv() -> list[str]:
    found = Path(sys.executable).with_name("uv")
    if not found.is_file():
        raise SystemExit(f"uv is missing beside {sys.executable}: make lock installs it (pip install uv)")
    return [str(found)]


def compile_(out: Path, *, hashes: bool, upgrade: bool, oldest: bool, exclude: list[str]) -> str:
    """Run ``uv pip compile`` into ``out``; returns uv's version."""
    proj = project()
    minimum = re.sub(r"^[>=~ ]+", "", proj["project"]["requires-python"])
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "torch.txt"
        constraints.write_text(f"torch=={torch_version()}\n")
        cmd = [*uv(), "pip", "compile", str(PYPROJECT.relative_to(ROOT)), "-", "--all-extras", "--no-header",
               "--constraint", str(constraints), "--output-file", str(out), "--quiet"]
        # the lock serves every platform and Python; the oldest set is for this interpreter, where it is tested
        cmd += ["--resolution", "lowest-direct", "--python", sys.executable] if oldest else [
            "--universal", "--python-version", minimum]
        cmd += ["--generate-hashes"] if hashes else []
        cmd += ["--upgrade"] if upgrade else []
        for name in exclude:
            cmd += ["--no-emit-package", name]
        subprocess.run(cmd, input="\n".join(build_requires(proj)) + "\n", text=True, check=True, cwd=ROOT)
    return subprocess.run([*uv(), "--version"], capture_output=True, text=True, check=True).stdout.split()[1]


def pinned_names(text: str) -> list[str]:
    """The package names pinned in a requirements file (``name==version``), in order."""
    return [m.group(1) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)]


def header(uv_version: str, digest: str) -> str:
    return "\n".join([
        "# saescope's lock: the exact release, and the hashes of its files, of every package that `make setup`,",
        "# `make test` and .ci/run install (pip install --require-hashes --no-deps -r requirements/lock.txt).",
        f"# Made by `make lock` (scripts/lock.py) with uv {uv_version} on {date.today().isoformat()}: one resolution for every",
        "# platform and every Python that pyproject.toml's requires-python admits (a marker where they differ).",
        "# Not here: torch and the CUDA libraries of its Linux builds. They are installed apart at the version below,",
        "# the CPU wheel or a CUDA build from the index the user names (make setup TORCH_INDEX=...).",
        f"{TORCH_LINE}{torch_version()}",
        f"{DIGEST_LINE}{digest}",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the current pins where they still satisfy pyproject.toml")
    parser.add_argument("--oldest", type=Path, help="write the oldest versions the floors allow to this file instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # first pass: which names the resolution holds, so torch's CUDA packages can be left out by name
        probe = Path(tmp) / "probe.txt"
        compile_(probe, hashes=False, upgrade=not args.keep, oldest=args.oldest is not None, exclude=[])
        exclude = [n for n in pinned_names(probe.read_text()) if TORCH_ONLY.match(n)]
        if args.oldest is not None:
            compile_(args.oldest, hashes=False, upgrade=True, oldest=True, exclude=exclude)
            print(f"wrote {args.oldest}: the oldest releases pyproject.toml's floors allow (torch left out)")
            return
        body = Path(tmp) / "lock.txt"
        if LOCK.is_file():
            body.write_text(LOCK.read_text())  # uv keeps the pins of an existing output file unless --upgrade
        version = compile_(body, hashes=True, upgrade=not args.keep, oldest=False, exclude=exclude)
        LOCK.parent.mkdir(exist_ok=True)
        LOCK.write_text(header(version, inputs_digest()) + body.read_text())
    names = pinned_names(LOCK.read_text())
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(set(names))} packages ({len(names)} pins), torch {torch_version()} "
          f"and {len(exclude) - 1} CUDA packages left out")


if __name__ == "__main__":
    main()
