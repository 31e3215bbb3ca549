"""A sharded task's saved state without pickle: one safetensors file whose tensors are the state's tensors and
whose metadata holds everything else as JSON with explicit types.

A shared run folder is written by many workers and read by whoever merges; a pickled state (``torch.load`` with
``weights_only=False``) would run any code a writer of that folder put in it. Reading this format parses JSON and
tensor bytes only: objects are built from an allow-list of accumulator classes (``CLASSES``) by setting their
fields, never by calling code named in the file. Values come back exactly (tensors bit for bit in their dtype,
ints as ints, floats through ``repr``), so a merge of loaded states is the merge of the states that were saved.
Tensors are memory-mapped (copy on write): a merge reads only the latents it works on.

Typed JSON values: ``{"type": "none"}``, ``{"type": "bool" | "int" | "str", "value": ...}``, ``{"type": "float",
"value": 1.5 | "nan" | "inf" | "-inf"}``, ``{"type": "tensor", "key": NAME}``, ``{"type": "list", "items": [...]}``,
``{"type": "dict", "items": {str: value}}`` and ``{"type": "object", "class": NAME, "fields": {str: value}}``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..analysis.metrics import ReconStats
from .accumulators import FeatureStats
from .darkmatter import LinearErrorStats, Moments
from .sampling import ContextSample

FORMAT = "saescope-task-state"
VERSION = "1"
CLASSES: dict[str, type] = {cls.__name__: cls for cls in (FeatureStats, ReconStats, LinearErrorStats, Moments, ContextSample)}
"""The only classes a state file can name."""


def save(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` (plain values, tensors, and ``CLASSES`` objects, nested) to ``path``: under a temporary name,
    then renamed, so the file exists only complete."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    tree = _encode(value, "", tensors, storages)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT, "version": VERSION, "state": json.dumps(tree, allow_nan=False)})
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """The value ``save`` wrote to ``path``; tensors on the CPU, memory-mapped."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}), so not a task state saescope reads (it never "
                         "unpickles): delete it and re-run its task") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a saescope task state of version {VERSION} (metadata format "
                         f"{meta.get('format')!r}, version {meta.get('version')!r}): delete it and re-run its task")
    try:
        tree = json.loads(meta["state"])
        out = _decode(tree, tensors, str(path))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the task state's JSON is missing or malformed ({err})") from err
    except RecursionError as err:
        raise ValueError(f"{path}: the task state's JSON is nested too deeply to be a task state") from err
    if not isinstance(out, dict):
        raise ValueError(f"{path}: a task state is a dict, found {type(out).__name__}")
    return out


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> dict:
    if value is None:
        return {"type": "none"}
    if isinstance(value, bool | np.bool_):
        return {"type": "bool", "value": bool(value)}
    if isinstance(value, int | np.integer):
        return {"type": "int", "value": int(value)}
    if isinstance(value, float | np.floating):
        x = float(value)
        return {"type": "float", "value": x if math.isfinite(x) else str(x)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors sharing memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = where.removeprefix(".")
        if key in tensors:
            raise ValueError(f"two tensors of the task state are both named {key!r}")
        tensors[key] = t
        return {"type": "tensor", "key": key}
    if isinstance(value, list | tuple):
        return {"type": "list", "items": [_encode(v, f"{where}.{i}", tensors, storages) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"a task state's dict keys must be strings, {where or 'the state'} has {list(value)}")
        return {"type": "dict", "items": {k: _encode(v, f"{where}.{k}", tensors, storages) for k, v in value.items()}}
    name = type(value).__name__
    if CLASSES.get(name) is type(value):
        return {"type": "object", "class": name,
                "fields": {k: _encode(v, f"{where}.{k}", tensors, storages) for k, v in vars(value).items()}}
    raise TypeError(f"cannot save {where or 'the state'} of type {type(value).__qualname__} in a task state: only "
                    f"plain values, tensors and {sorted(CLASSES)} are stored")


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise ValueError(f"{path}: malformed task state entry {str(node)[:200]}")
    kind = node["type"]
    if kind == "none":
        return None
    if kind in ("bool", "int", "str", "float"):
        value = node.get("value")
        if kind == "float" and (isinstance(value, str) and value in ("nan", "inf", "-inf")
                                or isinstance(value, int | float) and not isinstance(value, bool)):
            return float(value)
        expected = {"bool": bool, "int": int, "str": str}.get(kind)
        if expected is None or not isinstance(value, expected) or (kind == "int" and isinstance(value, bool)):
            raise ValueError(f"{path}: an entry of type {kind} holds {value!r}")
        return value
    if kind == "tensor":
        if node.get("key") not in tensors:
            raise ValueError(f"{path}: the state names tensor {node.get('key')!r}, which the file lacks")
        return tensors[node["key"]]
    if kind == "list" and isinstance(node.get("items"), list):
        return [_decode(v, tensors, path) for v in node["items"]]
    if kind in ("dict", "object"):
        items = node.get("items" if kind == "dict" else "fields")
        if not isinstance(items, dict):
            raise ValueError(f"{path}: a {kind} entry without its {'items' if kind == 'dict' else 'fields'}")
        values = {k: _decode(v, tensors, path) for k, v in items.items()}
        if kind == "dict":
            return values
        cls = CLASSES.get(str(node.get("class")))
        if cls is None:
            raise ValueError(f"{path}: class {node.get('class')!r} is not one a task state may hold ({sorted(CLASSES)})")
        bad = [k for k in values if not k.isidentifier() or k.startswith("__")]
        if bad:
            raise ValueError(f"{path}: {cls.__name__} fields {bad} are not field names")
        obj = object.__new__(cls)  # no constructor runs: the fields are the state
        vars(obj).update(values)
        return obj
    raise ValueError(f"{path}: unknown task state entry type {kind!r}")
