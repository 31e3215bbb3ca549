"""The layering of pyproject.toml's [tool.saescope.layers] holds, and the checks make lint runs catch a break:
scripts/layers.py on a copy of the tree with one bad import planted, and ruff's banned Streamlit import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import layers  # noqa: E402


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for pkg in ("engine", "dashboard"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    return root


def plant(root: Path, module: str, line: str) -> None:
    path = root / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_the_tree_follows_the_layers():
    assert layers.check(ROOT) == []


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("engine/saes/base.py", "from ..model import loading", "engine.saes imports engine.model.loading from its sibling"),
    ("engine/model/hooks.py", "from ..run.store import RunStore", "engine.model (layer 5) imports engine.run.store from a "
                                                                     "higher layer (engine.run, layer 4)"),
    ("engine/precompute/merge.py", "from ..live import lens", "engine.precompute imports engine.live.lens from its sibling"),
    ("engine/run/store.py", "import engine.cli", "engine.run (layer 4) imports engine.cli from a higher layer"),
    ("engine/data/corpus.py", "from .. import load_sae", "from the package root"),
    ("engine/analysis/dfa.py", "from .interventions import _as_act", "imports the private name _as_act"),
    ("engine/analysis/dfa.py", "import streamlit", "engine code imports streamlit"),
    ("dashboard/common.py", "from engine.cli import main", "the app imports engine.cli"),
])
def test_a_planted_bad_import_is_reported(tmp_path, module, line, expected):
    root = copy_tree(tmp_path)
    assert layers.check(root) == []
    plant(root, module, line)
    found = [str(v) for v in layers.check(root)]
    assert len(found) == 1 and found[0].startswith(f"{module}:") and expected in found[0], found
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "layers.py"), str(root)], capture_output=True, text=True)
    assert run.returncode == 1 and expected in run.stdout


def test_ruff_bans_streamlit_in_the_engine_only(tmp_path):
    root = copy_tree(tmp_path)
    plant(root, "engine/run/store.py", "import streamlit")
    plant(root, "dashboard/common.py", "import streamlit as st2")
    ruff = Path(sys.executable).with_name("ruff")
    run = subprocess.run([str(ruff), "check", "--no-cache", "--select", "TID251", "engine", "dashboard"], cwd=root,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "engine/run/store.py" in run.stdout and "TID251" in run.stdout and "dashboard/common.py" not in run.stdout
