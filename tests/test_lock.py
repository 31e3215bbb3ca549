"""requirements/lock.txt agrees with pyproject.toml: every requirement locked at a version it allows, every locked
package needed, nothing unpinned or unhashed, torch left to its own install, and no edit of pyproject.toml's
requirements without a new lock (``make lock``)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PROJECT_ROOT = "saescope (pyproject.toml)"


def _load_lock_script():
    spec = importlib.util.spec_from_file_location("saescope_lock_script", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_script = _load_lock_script()


@dataclass
class Pin:
    name: str
    version: Version
    marker: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def parse_lock(text: str) -> list[Pin]:
    """The pins of a ``uv pip compile --generate-hashes`` file: name, version, marker, hashes and ``# via`` parents."""
    pins: list[Pin] = []
    in_via = False
    for line in text.splitlines():
        entry = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ; (.*?))?(?: \\)?$", line)
        if entry:
            pins.append(Pin(canonicalize_name(entry.group(1)), Version(entry.group(2)), entry.group(3) or ""))
            in_via = False
        elif not pins or not line.startswith("    "):
            in_via = False
        elif (h := re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line)):
            pins[-1].hashes.append(h.group(1))
        elif (v := re.match(r"^\s+# via(?: (.+))?$", line)):
            in_via = v.group(1) is None
            if v.group(1):
                pins[-1].via.append(v.group(1).strip())
        elif in_via and (p := re.match(r"^\s+#\s{3}(.+)$", line)):
            pins[-1].via.append(p.group(1).strip())
    return pins


def requirements(project: dict) -> list[Requirement]:
    """Every requirement pyproject.toml states: dependencies, every extra's, and the build backend's."""
    proj = project["project"]
    texts = [*proj.get("dependencies", []), *(r for extra in proj.get("optional-dependencies", {}).values() for r in extra),
             *project["build-system"]["requires"]]
    return [Requirement(t) for t in texts]


def disagreements(project: dict, pins: list[Pin]) -> list[str]:
    """What makes the lock and pyproject.toml disagree, one line each (empty when they agree)."""
    problems: list[str] = []
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    stated = {canonicalize_name(r.name) for r in requirements(project)}
    build = {canonicalize_name(Requirement(r).name) for r in project["build-system"]["requires"]}
    for req in requirements(project):
        name = canonicalize_name(req.name)
        if lock_script.TORCH_ONLY.match(name):
            continue  # installed apart, at the Makefile's version
        if name not in by_name:
            problems.append(f"{req} is in pyproject.toml but not in the lock")
            continue
        for pin in by_name[name]:
            if not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"the lock pins {name}=={pin.version}, which pyproject.toml's {req} does not allow")
    # every locked package is needed: a requirement of pyproject.toml, of torch, or of another needed package
    needed = {PROJECT_ROOT, "torch"}
    for pin in pins:
        if not pin.via and pin.name not in build:
            problems.append(f"{pin.name} is in the lock with no requirement behind it")
    grew = True
    while grew:
        grew = False
        for pin in pins:
            if pin.name not in needed and (pin.name in build or any(canonicalize_name(v) in needed or v in needed
                                                                     for v in pin.via)):
                needed.add(pin.name)
                grew = True
    for name in sorted(set(by_name) - needed):
        problems.append(f"{name} is in the lock but nothing in pyproject.toml needs it")
    for pin in pins:
        if PROJECT_ROOT in pin.via and pin.name not in stated:
            problems.append(f"the lock says pyproject.toml requires {pin.name}, and it does not")
    return problems


@pytest.fixture(scope="module")
def lock_text() -> str:
    assert LOCK.is_file(), f"{LOCK} is missing: run `make lock`"
    return LOCK.read_text()


def test_lock_was_made_from_todays_pyproject(lock_text):
    digest = re.search(rf"^{re.escape(lock_script.DIGEST_LINE)}([0-9a-f]{{64}})$", lock_text, re.M)
    torch = re.search(rf"^{re.escape(lock_script.TORCH_LINE)}(\S+)$", lock_text, re.M)
    assert digest and torch, "the lock's header lacks its inputs: run `make lock`"
    assert torch.group(1) == lock_script.torch_version(), "the Makefile installs another torch than the lock was made for"
    assert digest.group(1) == lock_script.inputs_digest(), (
        "pyproject.toml's requirements changed since the lock was made: run `make lock` "
        "(or `python scripts/lock.py --keep` to move only what must)")


def test_lock_and_pyproject_name_the_same_packages(lock_text):
    assert disagreements(lock_script.project(), parse_lock(lock_text)) == []


def test_every_pin_is_exact_and_hashed_and_torch_is_left_out(lock_text):
    pins = parse_lock(lock_text)
    assert len(pins) == len(re.findall(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", lock_text, re.M)) > 50
    assert not re.search(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(>=|<=|~=|!=|>|<)", lock_text, re.M)  # pins only
    assert all(pin.hashes for pin in pins), [pin.name for pin in pins if not pin.hashes]
    assert not [pin.name for pin in pins if lock_script.TORCH_ONLY.match(pin.name)]
    # one pin per name, or several told apart by their markers (one per Python range)
    names = [pin.name for pin in pins]
    assert all(pin.marker for pin in pins if names.count(pin.name) > 1)


def test_the_check_catches_a_disagreement(lock_text):
    """The checks above can fail: a requirement the lock lacks, a pin outside a floor, a package nobody needs."""
    project = lock_script.project()
    pins = parse_lock(lock_text)
    planted = {**project, "project": {**project["project"],
                                      "dependencies": [*project["project"]["dependencies"], "saescope-missing>=1"]}}
    assert disagreements(planted, pins) == ["saescope-missing>=1 is in pyproject.toml but not in the lock"]

    duckdb = next(p for p in pins if p.name == "duckdb")
    raised = [r if not r.startswith("duckdb") else f"duckdb>{duckdb.version}" for r in project["project"]["dependencies"]]
    floor = disagreements({**project, "project": {**project["project"], "dependencies": raised}}, pins)
    assert floor == [f"the lock pins duckdb=={duckdb.version}, which pyproject.toml's duckdb>{duckdb.version} does not allow"]

    stray = Pin("left-behind", Version("1.0"), "", ["0" * 64], ["nothing-here"])
    assert disagreements(project, [*pins, stray]) == ["left-behind is in the lock but nothing in pyproject.toml needs it"]
    dropped = [r for r in project["project"]["dependencies"] if not r.startswith("gguf")]
    gone = disagreements({**project, "project": {**project["project"], "dependencies": dropped}}, pins)
    assert "the lock says pyproject.toml requires gguf, and it does not" in gone


def test_parse_lock_reads_uvs_layout():
    text = """# header
alpha==1.2.3 ; python_full_version < '3.11' \\
    --hash=sha256:{a} \\
    --hash=sha256:{b}
    # via
    #   saescope (pyproject.toml)
    #   beta
beta==2.0 \\
    --hash=sha256:{a}
    # via saescope (pyproject.toml)
""".format(a="a" * 64, b="b" * 64)
    alpha, beta = parse_lock(text)
    assert (alpha.name, str(alpha.version), alpha.marker) == ("alpha", "1.2.3", "python_full_version < '3.11'")
    assert alpha.hashes == ["a" * 64, "b" * 64] and alpha.via == [PROJECT_ROOT, "beta"]
    assert (beta.name, beta.marker, beta.hashes, beta.via) == ("beta", "", ["a" * 64], [PROJECT_ROOT])
