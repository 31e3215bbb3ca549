"""Resumable training: the trainer's whole state at a buffer boundary, written aside and renamed whole.

A checkpoint folder ``.<out>.checkpoint`` beside the output holds ``state.safetensors`` (weights, Adam moments,
bookkeeping buffers, the activations read but not yet used) and ``progress.json`` (settings, step, tokens seen,
contexts consumed, log). ``train-sae`` rerun with the same settings continues from it; it is removed once the SAE is
written. Safetensors and JSON only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from .families import TopKTrainer

STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
UNCOMPARED = ("checkpoint_minutes",)
"""Settings a resumed run may change."""


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def save(folder: Path, trainer: TopKTrainer, carry: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
    """Write the checkpoint whole (the previous one stays until the new one is complete)."""
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainer.named_parameters()}
    tensors.update({f"buffer.{n}": b.detach().cpu().contiguous() for n, b in trainer.named_buffers()})
    names = {id(p): n for n, p in trainer.named_parameters()}
    adam_steps: dict[str, float] = {}
    for p, st in trainer.opt.state.items():
        name = names[id(p)]
        tensors[f"adam.{name}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
        tensors[f"adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
        adam_steps[name] = float(st["step"])
    tensors.update({f"carry.{n}": t.detach().cpu().contiguous() for n, t in carry.items()})
    with atomic.build_dir(folder) as tmp:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / PROGRESS_FILE).write_text(json.dumps({**progress, "adam_steps": adam_steps}, indent=2))


def load(folder: Path, trainer: TopKTrainer, settings: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``trainer`` from ``folder``; returns the carried activations and the progress record. A ValueError
    when the checkpoint was made with other settings."""
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    saved = progress.get("settings", {})
    differ = sorted(k for k in set(saved) | set(settings) if k not in UNCOMPARED and saved.get(k) != settings.get(k))
    if differ:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {settings.get(k)!r})" for k in differ[:4])
        raise ValueError(f"{folder} is a checkpoint of a train-sae run with other settings: {shown}; rerun with those "
                         "settings to resume it, or pass --restart to discard it")
    tensors = load_file(str(folder / STATE_FILE))
    device = trainer.W_dec.device
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            p.copy_(tensors[f"param.{n}"].to(device))
        for n, b in trainer.named_buffers():
            b.copy_(tensors[f"buffer.{n}"].to(device))
    for n, p in trainer.named_parameters():
        if f"adam.{n}.exp_avg" in tensors:
            trainer.opt.state[p] = {
                "step": torch.tensor(progress["adam_steps"][n]),
                "exp_avg": tensors[f"adam.{n}.exp_avg"].to(device),
                "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].to(device),
            }
    carry = {k.removeprefix("carry."): t.to(device) for k, t in tensors.items() if k.startswith("carry.")}
    return carry, progress
