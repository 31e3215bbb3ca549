"""Resumable training: the trainer's whole state at a buffer boundary, written aside and renamed whole.

A checkpoint folder ``.<out>.checkpoint`` beside the output holds ``state.safetensors`` (weights, Adam moments,
bookkeeping buffers, the activations read but not yet used) and ``progress.json`` (settings, step, tokens seen,
contexts consumed, log). ``train-sae`` rerun with the same settings continues from it; it is removed once the SAE is
written. Safetensors and JSON only (never pickle). Several SAEs trained in one pass each have their own checkpoint,
all of one generation (``save_pass``, ``load_pass``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from .families import TopKTrainer

STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
NEXT_MARK = ".next"
"""Beside a checkpoint: its next generation, written whole before any checkpoint of the pass is replaced."""
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


def _next(folder: Path) -> Path:
    return folder.with_name(folder.name + NEXT_MARK)


def _generation(folder: Path) -> int | None:
    path = folder / PROGRESS_FILE
    return int(json.loads(path.read_text())["buffers"]) if path.is_file() else None


def save_pass(folders: list[Path], trainers: list[TopKTrainer], carry: dict[str, torch.Tensor],
              progress: list[dict[str, Any]]) -> None:
    """The checkpoints of one training pass (one folder per SAE), all of one generation: each new one is first
    written whole beside its folder (``<folder>.next``), then each is moved into place. A kill in between leaves,
    for every SAE, the new generation or the old one complete; ``load_pass`` picks the newest all of them have."""
    for folder, trainer, prog in zip(folders, trainers, progress, strict=True):
        save(_next(folder), trainer, carry, prog)
    for folder in folders:
        atomic.replace_dir(_next(folder), folder)


def load_pass(folders: list[Path], trainers: list[TopKTrainer], settings: list[dict[str, Any]]
              ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None:
    """Restore every trainer of a pass from the newest generation that all its checkpoints reached (finishing a
    move ``save_pass`` was interrupted in); None when there is no checkpoint. The carried activations and each
    SAE's progress record."""
    found: list[dict[int, Path]] = []
    for folder in folders:
        atomic.recover_dir(folder)
        here = {}
        for candidate in (folder, _next(folder)):
            gen = _generation(candidate)
            if gen is not None:
                here[gen] = candidate
        found.append(here)
    if not any(found):
        return None
    common = set.intersection(*(set(f) for f in found))
    if not common:
        missing = [str(f) for f, here in zip(folders, found, strict=True) if not here]
        why = f"{', '.join(missing)} has none" if missing else "they are from different points of a pass"
        raise ValueError(f"the checkpoints of this train-sae pass do not match ({why}): rerun the command that made "
                         "them, or pass --restart to discard them")
    gen = max(common)
    carry: dict[str, torch.Tensor] = {}
    records = []
    for folder, here, trainer, s in zip(folders, found, trainers, settings, strict=True):
        if here[gen] != folder:  # the move into place that a kill interrupted
            atomic.replace_dir(here[gen], folder)
        elif _next(folder).exists():  # a newer checkpoint that not every SAE of the pass reached
            shutil.rmtree(_next(folder))
        carry, record = load(folder, trainer, s)
        records.append(record)
    return carry, records


def discard(folders: list[Path]) -> None:
    """Remove the checkpoints (and any half-moved generation) of a pass."""
    for folder in folders:
        atomic.recover_dir(folder)
        for path in (folder, _next(folder)):
            if path.exists():
                shutil.rmtree(path)
