"""Task states of a sharded precompute are safetensors + typed JSON: they read back exactly, merge as the saved
states merge, and a file someone planted in a shared run folder cannot run code (no pickle)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.analysis.metrics import ReconStats
from engine.precompute import statefile
from engine.precompute.accumulators import FeatureStats, sparse_codes
from engine.precompute.darkmatter import LinearErrorStats
from engine.precompute.sampling import ContextSample
from engine.precompute.shards import load_state, save_state, state_path

D_IN, D_SAE, POS = 6, 12, 8


def _states(seed: int):
    """Real accumulators fed real (random) data: every kind of field a task state holds."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(40, D_SAE, generator=gen) * torch.logspace(-1, 2, D_SAE)
    codes[torch.rand(codes.shape, generator=gen) < 0.6] = 0
    stats = FeatureStats(D_SAE, n_bins=16)
    stats.update(sparse_codes(codes, torch.ones(40, dtype=torch.bool)), 40, 40)
    x = torch.randn(40, D_IN, generator=gen) * 3 + 5
    e = torch.randn(40, D_IN, generator=gen)
    recon = ReconStats(D_IN)
    recon.update(x, x - e, n_active=123)
    dark = LinearErrorStats(D_IN)
    dark.update(x, e, torch.arange(40) % 3 == 0, torch.arange(40) // 8, torch.arange(40) % 8)
    sample = ContextSample(3, POS, D_IN, seed=seed)
    ids = torch.arange(seed * 100, seed * 100 + 50, 10)
    sample.offer(ids, torch.randint(0, 99, (5, POS), generator=gen), torch.rand(5, POS, generator=gen) < 0.5,
                 torch.randn(5, POS, D_IN, generator=gen), torch.randn(5, POS, D_IN, generator=gen),
                 torch.randint(0, 9, (5, POS), generator=gen))
    sample.gen = None
    return stats, recon, dark, sample


def _same(a, b) -> bool:
    """Exactly equal, tensors bit for bit and in dtype, objects of the same class field by field."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__"):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return type(a) is type(b) and a == b


def test_a_state_reads_back_exactly(tmp_path):
    stats, recon, dark, sample = _states(1)
    value = {"summary": {"index": 3, "seconds": 0.1 + 0.2, "host": "h", "peak_gpu_mb": None, "contexts": [0, 16],
                         "nan": float("nan"), "inf": float("-inf"), "flag": True, "big": 2**62 + 1},
             "stats": stats, "recon": recon, "dark": dark, "sample": sample, "recon_massive": None,
             "examples": {"val": torch.rand(D_SAE, 5, dtype=torch.float32), "acts": torch.rand(D_SAE, 5, POS).half(),
                          "payload.heads": torch.rand(D_SAE, 5, 2, dtype=torch.float64)},
             "scalar": torch.tensor(3.5, dtype=torch.float64)}
    path = tmp_path / "task-0000.safetensors"
    statefile.save(path, value)
    back = statefile.load(path)
    assert _same(value, back)
    assert back["summary"]["seconds"] == 0.30000000000000004 and isinstance(back["summary"]["index"], int)
    assert dark.shift_x is not None and back["dark"].shift_x.dtype == torch.float32  # a real, filled state
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written under a temporary name, then renamed


def test_loaded_states_merge_as_the_saved_ones(tmp_path):
    saved = [_states(seed) for seed in (1, 2)]
    for i, (stats, recon, dark, sample) in enumerate(saved):
        statefile.save(tmp_path / f"s{i}.safetensors", {"stats": stats, "recon": recon, "dark": dark, "sample": sample})
    loaded = [statefile.load(tmp_path / f"s{i}.safetensors") for i in (0, 1)]
    import numpy as np

    (a_stats, a_recon, a_dark, a_sample), (b_stats, b_recon, b_dark, b_sample) = saved
    a_stats.merge(b_stats)
    a_recon.merge(b_recon)
    a_dark.merge(b_dark)
    a_sample.merge(b_sample, np.random.default_rng(0))
    first, second = loaded
    for name in ("stats", "recon", "dark"):
        first[name].merge(second[name])
    first["sample"].merge(second["sample"], np.random.default_rng(0))
    assert _same({"stats": a_stats, "recon": a_recon, "dark": a_dark, "sample": a_sample},
                 {k: first[k] for k in ("stats", "recon", "dark", "sample")})
    again = statefile.load(tmp_path / "s0.safetensors")  # merging wrote to copy-on-write maps, not to the file
    assert _same(again["stats"], _states(1)[0])


class _Plant:
    """What an attacker with write access to the shared run folder puts in a task state: code run on unpickling."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_in_place_of_a_state_is_refused_without_running(tmp_path):
    class Task:
        index = 0

    path = state_path(tmp_path, Task())  # type: ignore[arg-type]
    marker = tmp_path / "pwned"
    torch.save({"stats": _Plant(str(marker))}, path)
    with pytest.raises(ValueError, match="not a safetensors file .* never unpickles"):
        load_state(path)
    assert not marker.exists(), "loading a task state ran code from the file"


@pytest.mark.parametrize(("tree", "message"), [
    ({"type": "object", "class": "Popen", "fields": {}}, "class 'Popen' is not one a task state may hold"),
    ({"type": "object", "class": "ReconStats", "fields": {"__class__": {"type": "none"}}}, "are not field names"),
    ({"type": "tensor", "key": "missing"}, "names tensor 'missing', which the file lacks"),
    ({"type": "int", "value": "1"}, "an entry of type int holds '1'"),
    ({"type": "eval", "value": "1"}, "unknown task state entry type 'eval'"),
])
def test_a_forged_state_is_refused_with_a_clear_message(tmp_path, tree, message):
    path = tmp_path / "task-0000.safetensors"
    save_file({"x": torch.zeros(2)}, path, metadata={"format": statefile.FORMAT, "version": statefile.VERSION,
                                                    "state": json.dumps({"type": "dict", "items": {"a": tree}})})
    with pytest.raises(ValueError, match=message):
        statefile.load(path)


def test_a_state_nested_without_end_is_refused(tmp_path):
    path = tmp_path / "task-0000.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"format": statefile.FORMAT, "version": statefile.VERSION,
                                                    "state": '{"type": "list", "items": [' * 100_000 + "]}" * 100_000})
    with pytest.raises(ValueError, match="nested too deeply"):
        statefile.load(path)
    save_file({"x": torch.zeros(1)}, path, metadata={"format": statefile.FORMAT, "version": statefile.VERSION})
    with pytest.raises(ValueError, match="JSON is missing or malformed"):
        statefile.load(path)


def test_objects_outside_the_allow_list_are_not_saved(tmp_path):
    with pytest.raises(TypeError, match="cannot save .gen of type Generator"):
        statefile.save(tmp_path / "s.safetensors", {"gen": torch.Generator()})
    assert not list(tmp_path.iterdir())


def test_save_state_writes_a_state_load_state_reads(tmp_path):
    from engine.precompute.pipeline import PassState

    stats, recon, dark, sample = _states(3)
    sample.gen = torch.Generator()  # as the pass leaves it: save_state drops it (the merge draws its own numbers)
    examples = type("Examples", (), {"state_dict": lambda self: {"val": torch.ones(D_SAE, 2)}})()
    state = PassState(stats=stats, examples=examples, recon=recon, dark=dark, sample=sample, recon_massive=None,  # type: ignore[arg-type]
                  heads=None, heads_note={"layer": 1, "reason": "no attention weights"}, n_contexts=5, n_tokens=40)
    path = tmp_path / "task-0007.safetensors"
    save_state(path, state, {"index": 7, "seconds": 1.5})
    back = load_state(path)
    assert back["summary"] == {"index": 7, "seconds": 1.5} and back["n_contexts"] == 5 and back["n_tokens"] == 40
    assert back["heads_note"] == {"layer": 1, "reason": "no attention weights"} and back["heads"] is None
    assert _same(back["stats"], stats) and _same(back["dark"], dark) and back["sample"].gen is None
    assert torch.equal(back["examples"]["val"], torch.ones(D_SAE, 2))
