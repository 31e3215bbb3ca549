"""engine/configs.py: a settings dataclass's fields become flags (name, type, default, help from the attribute
docstring) and come back as the same config; precompute's CLI takes every PrecomputeConfig field this way."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from engine import configs
from engine.precompute.pipeline import PrecomputeConfig


@dataclasses.dataclass(frozen=True)
class Example:
    width: int = 8
    """How wide."""
    rate: float | None = None
    """A rate, if any."""
    name: str = "x"
    fast: bool = False
    """Go fast."""
    parts: tuple[str, ...] = ("a", "b")
    """Which parts."""


def test_flags_come_from_the_fields_and_give_the_same_config_back():
    p = argparse.ArgumentParser()
    assert configs.add_arguments(p, Example) == ["width", "rate", "name", "fast", "parts"]
    assert configs.from_args(Example, p.parse_args([])) == Example()
    args = p.parse_args(["--width", "3", "--rate", "0.5", "--fast", "--parts", "c,d"])
    assert configs.from_args(Example, args) == Example(width=3, rate=0.5, fast=True, parts=("c", "d"))
    text = p.format_help()
    assert "How wide. (default: 8)" in text and "Go fast. (default: off)" in text and "--no-fast" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--width", "wide"])


def test_precompute_has_a_flag_for_every_setting():
    from engine.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["precompute"]
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {configs.flag(f.name) for f in dataclasses.fields(PrecomputeConfig)} <= flags
    args = parser.parse_args(["--model", "m", "--sae", "s", "--corpus", "c", "--out", "o", "--ridge", "0.01",
                              "--quantile-bins", "4", "--include-first"])
    assert configs.from_args(PrecomputeConfig, args) == PrecomputeConfig(ridge=0.01, quantile_bins=4, include_first=True)
