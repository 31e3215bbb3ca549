"""No pickle anywhere in engine/ or dashboard/: a file saescope reads (a run, a task state, an SAE) must not be able
to run code. An AST scan, so aliases (``import torch as t``, ``from torch import load``) and keyword spellings count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
"""Modules that unpickle (or load code objects) when they read."""


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems(source: str, name: str) -> list[str]:
    """Where ``source`` imports a pickler, calls ``torch.load`` without ``weights_only=True``, or ``np.load`` /
    ``pandas.read_pickle`` in a way that unpickles."""
    tree = ast.parse(source, name)
    aliases: dict[str, str] = {}  # local name -> dotted origin
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if alias.name.split(".")[0] in PICKLERS:
                    found.append(f"{name}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if node.module.split(".")[0] in PICKLERS:
                found.append(f"{name}:{node.lineno} imports from {node.module}")

    def origin(func: ast.expr) -> str:
        if isinstance(func, ast.Name):
            return aliases.get(func.id, func.id)
        if isinstance(func, ast.Attribute):
            return f"{origin(func.value)}.{func.attr}"
        return ""

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = origin(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if called in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
            found.append(f"{name}:{node.lineno} calls torch.load without weights_only=True")
        elif called in ("numpy.load", "np.load") and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
            found.append(f"{name}:{node.lineno} calls np.load with allow_pickle other than False")
        elif called.endswith("read_pickle") or called in ("torch.jit.load", "torch.package.PackageImporter"):
            found.append(f"{name}:{node.lineno} calls {called}")
    return found


def test_no_engine_or_dashboard_module_unpickles():
    files = sorted(p for folder in ("engine", "dashboard") for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50  # the scan sees the packages
    found = [line for path in files for line in problems(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "unpickling code (a file could run code as whoever reads it):\n" + "\n".join(found)


@pytest.mark.parametrize(("source", "expected"), [
    ("import pickle", "imports pickle"),
    ("from pickle import loads", "imports from pickle"),
    ("import joblib as jl", "imports joblib"),
    ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
    ("import torch as t\nt.load(p, weights_only=False)", "torch.load without weights_only=True"),
    ("from torch import load\nload(p, mmap=True)", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "np.load with allow_pickle other than False"),
    ("import pandas as pd\npd.read_pickle(p)", "calls pandas.read_pickle"),
])
def test_the_scan_sees_each_spelling(source, expected):
    assert any(expected in line for line in problems(source, "m.py")), problems(source, "m.py")


@pytest.mark.parametrize("source", ["import torch\ntorch.load(p, weights_only=True)", "import numpy as np\nnp.load(p)",
                                    "import numpy as np\nnp.load(p, allow_pickle=False)", "import safetensors.torch"])
def test_the_scan_lets_safe_loads_pass(source):
    assert problems(source, "m.py") == []
