"""Command-line pieces every command that loads a model shares: its flags and how ``demo`` is resolved."""

from __future__ import annotations

import argparse


def model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="local dir, hub id, .gguf file, or 'demo'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype", default="auto",
        help="auto (the fastest on this machine: see `saescope info --model`), float32, bfloat16 or float16",
    )


def load_cli_model(name: str, device: str, dtype: str):
    """The model a ``--model`` names (``demo``: the demo model, fetched and converted on first use)."""
    from .loading import load_model

    if name == "demo":
        from .demo import ensure_demo_model

        name = str(ensure_demo_model())
    return load_model(name, device=device, dtype=dtype)
