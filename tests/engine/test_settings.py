"""engine/settings.py: every SAESCOPE_* variable is declared once, read only through it, typed, and never printed
when secret."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from engine import settings
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_every_saescope_variable_in_the_code_is_declared_and_read_through_settings():
    used, direct = set(), []
    for path in [*ROOT.joinpath("engine").rglob("*.py"), *ROOT.joinpath("dashboard").rglob("*.py")]:
        text = path.read_text()
        used |= set(re.findall(r"\bSAESCOPE_[A-Z_]+\b", text))
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).startswith("SAESCOPE_")):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert used <= set(settings.REGISTRY), sorted(used - set(settings.REGISTRY))
    assert direct == []


def test_values_are_parsed_to_their_type_and_bad_ones_named(monkeypatch):
    monkeypatch.setenv("SAESCOPE_SNAPSHOT_MIN_SECONDS", "12.5")
    monkeypatch.setenv("SAESCOPE_READ_ONLY", "yes")
    monkeypatch.setenv("SAESCOPE_CACHE_DIR", "~/x")
    assert settings.get(settings.SNAPSHOT_MIN_SECONDS) == 12.5 and settings.get(settings.READ_ONLY) is True
    assert settings.get(settings.CACHE_DIR) == Path.home() / "x"
    monkeypatch.setenv("SAESCOPE_READ_ONLY", "maybe")
    with pytest.raises(ValueError, match=r"\$SAESCOPE_READ_ONLY is 'maybe'"):
        settings.get(settings.READ_ONLY)
    monkeypatch.setenv("SAESCOPE_SNAPSHOT_MIN_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"\$SAESCOPE_SNAPSHOT_MIN_SECONDS is 'soon': expected a float"):
        settings.get(settings.SNAPSHOT_MIN_SECONDS)
    monkeypatch.setenv("SAESCOPE_DEVICE", "  ")
    assert settings.get(settings.DEVICE) == "auto"  # blank is unset


def test_info_lists_the_settings_and_hides_secrets(monkeypatch, capsys):
    monkeypatch.setenv("SAESCOPE_EXPLAINER_KEY", "sk-do-not-print")
    monkeypatch.setenv("SAESCOPE_DEVICE", "cpu")
    assert main(["info", "--settings"]) == 0
    out = capsys.readouterr().out
    assert "sk-do-not-print" not in out and "SAESCOPE_EXPLAINER_KEY = (set, hidden)" in out
    assert "SAESCOPE_DEVICE = cpu (set)" in out
    assert {line.split(" = ")[0] for line in out.splitlines() if line.startswith("SAESCOPE_")} == set(settings.REGISTRY)
