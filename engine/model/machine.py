"""What this machine is, and which dtype runs fastest on it.

On CUDA the answer is bf16 (fp16 where bf16 is unsupported) and on MPS fp16. On a CPU it depends on the
CPU kind and on what a hypervisor exposes: bf16 matmuls are 2-8x *faster* than fp32 on Intel CPUs with
AMX or AVX512_BF16, and 7-50x *slower* on CPUs without them (AVX2-only AMD EPYC, for example), where torch
emulates them. Flags alone can mislead under virtualisation, so ``auto`` on a CPU is decided by a short
micro-benchmark of the matmul shapes a model of the given width runs (fp32 against bf16, bounded to a few
hundred milliseconds), cached per machine in the user's cache directory, with the CPU flags as a fallback
when the benchmark cannot run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import atomic, settings

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
"""CPU flags worth reporting next to a measurement (from ``/proc/cpuinfo``)."""
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""Flags that mean native bf16 arithmetic (used only when the benchmark cannot run)."""
BF16_MIN_SPEEDUP = 1.25
"""bf16 is chosen only when it runs the benchmark at least this many times faster than fp32: a near-tie is
not worth bf16's lost precision."""
CACHE_VERSION = 1
CACHE_ENV = settings.CACHE_DIR.name


@dataclass(frozen=True)
class CpuFacts:
    """The CPU a measurement ran on."""

    model: str
    """``lscpu``'s model name (``/proc/cpuinfo``), or the platform's processor string."""
    flags: tuple[str, ...]
    """Which of ``ISA_FLAGS`` the CPU reports."""
    threads: int
    """torch's intra-op threads."""
    logical_cpus: int
    torch: str
    arch: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags)}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype ``auto`` resolves to on one device, and why."""

    dtype: str
    """``float32``, ``bfloat16`` or ``float16``."""
    reason: str
    """One sentence a user can read."""
    source: str
    """``benchmark`` (measured now), ``cache`` (measured earlier on this machine), ``flags`` or ``device``."""
    fp32_ms: float | None = None
    bf16_ms: float | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bf16_speedup(self) -> float | None:
        """fp32 time / bf16 time in the benchmark (> 1: bf16 is faster)."""
        if self.fp32_ms is None or not self.bf16_ms:
            return None
        return self.fp32_ms / self.bf16_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bf16_speedup": self.bf16_speedup}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_facts() -> CpuFacts:
    """Model name, ISA flags, threads and torch version of this machine's CPU."""
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flag_line = next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")), "")
    present = set(flag_line.split())
    return CpuFacts(
        model=model or platform.processor() or platform.machine(),
        flags=tuple(f for f in ISA_FLAGS if f in present),
        threads=torch.get_num_threads(),
        logical_cpus=os.cpu_count() or 1,
        torch=torch.__version__,
        arch=platform.machine(),
    )


def cache_dir() -> Path:
    """``$SAESCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/saescope``, else ``~/.cache/saescope``."""
    if (configured := settings.get(settings.CACHE_DIR)) is not None:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saescope"


def _products(dtype: torch.dtype, width: int, rows: int = 128) -> Callable[[], object]:
    """The products a model of ``width`` runs: a linear layer ``[rows, width] -> 2*width`` (``F.linear``)
    and an SAE-sized ``[rows, width] @ [width, 4*width]``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    w = torch.randn(2 * width, width, generator=gen).to(dtype)
    enc = torch.randn(width, 4 * width, generator=gen).to(dtype)

    def work() -> None:
        torch.nn.functional.linear(x, w)
        _ = x @ enc

    return work


def _timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def benchmark_cpu(width: int, repeats: int = 5) -> tuple[float, float]:
    """(fp32 ms, bf16 ms): the fastest of a few timed calls of ``_products`` after a warm-up call each.

    bf16 stops after one timed call when that call is already 4x fp32's best: where bf16 is emulated a call
    takes ~50x fp32, and more calls would only spend time to confirm it (the whole check stays < ~0.5 s).
    """
    fp32 = _products(torch.float32, width)
    fp32()
    fp32_ms = min(_timed_ms(fp32) for _ in range(repeats))
    bf16 = _products(torch.bfloat16, width)
    bf16()
    bf16_ms = _timed_ms(bf16)
    if bf16_ms > 4 * fp32_ms:
        return fp32_ms, bf16_ms
    return fp32_ms, min([bf16_ms] + [_timed_ms(bf16) for _ in range(repeats - 1)])


def _cache_key(facts: CpuFacts, width: int) -> str:
    raw = json.dumps([CACHE_VERSION, facts.model, facts.flags, facts.threads, facts.logical_cpus, facts.torch, width,
                      os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("ONEDNN_MAX_CPU_ISA")])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key``; an unwritable cache directory only costs a re-measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        atomic.write_json(path, data, indent=1)
    except OSError:
        pass


def _decide(fp32_ms: float, bf16_ms: float, source: str) -> DtypeChoice:
    speedup = fp32_ms / bf16_ms if bf16_ms > 0 else float("inf")
    if speedup >= BF16_MIN_SPEEDUP:
        dtype, verdict = "bfloat16", f"bf16 runs {speedup:.1f}x faster than fp32"
    elif speedup < 1:
        dtype, verdict = "float32", f"bf16 is {1 / speedup:.1f}x slower than fp32 (emulated on this CPU)"
    else:
        dtype = "float32"
        verdict = f"bf16 is only {speedup:.2f}x faster than fp32 (< {BF16_MIN_SPEEDUP}x: not worth the precision)"
    when = "measured now" if source == "benchmark" else "measured earlier on this machine"
    reason = f"{verdict} in a matmul micro-benchmark ({fp32_ms:.2f} vs {bf16_ms:.2f} ms, {when})"
    return DtypeChoice(dtype, reason, source, fp32_ms, bf16_ms)


def choose_cpu_dtype(
    width: int = 576,
    *,
    use_cache: bool = True,
    benchmark: Callable[[int], tuple[float, float]] | None = None,
    facts: CpuFacts | None = None,
) -> DtypeChoice:
    """The fastest of fp32 and bf16 for a model of ``width`` on this CPU (see the module docstring).

    ``benchmark`` (width -> (fp32 ms, bf16 ms)) and ``facts`` can be given to simulate another CPU.
    """
    facts = facts or cpu_facts()
    path = cache_dir() / "cpu-dtype.json"
    key = _cache_key(facts, width)
    if use_cache and benchmark is None:
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and {"fp32_ms", "bf16_ms"} <= entry.keys():
            return _decide(float(entry["fp32_ms"]), float(entry["bf16_ms"]), "cache")
    try:
        fp32_ms, bf16_ms = (benchmark or benchmark_cpu)(width)
    except Exception as err:
        fast = any(f in facts.flags for f in BF16_FLAGS)
        why = f"the micro-benchmark failed ({type(err).__name__}: {err}); CPU flags {'show' if fast else 'lack'} native bf16"
        return DtypeChoice("bfloat16" if fast else "float32", why, "flags")
    if use_cache and benchmark is None:
        _write_cache(path, key, {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "cpu": facts.model, "width": width,
                                 "flags": list(facts.flags), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return _decide(fp32_ms, bf16_ms, "benchmark")


def choose_dtype(device: torch.device, width: int = 576, **kwargs: Any) -> DtypeChoice:
    """What ``--dtype auto`` means on ``device`` for a model of ``width``."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "CUDA device with bf16 support", "device")
        return DtypeChoice("float16", "CUDA device without bf16 support", "device")
    if device.type == "mps":
        return DtypeChoice("float16", "Apple MPS device", "device")
    return choose_cpu_dtype(width, **kwargs)
