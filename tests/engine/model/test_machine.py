"""Choosing the dtype for this machine: micro-benchmark, cache, flags fallback; CPU facts for reports."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from engine.model import machine
from engine.model.machine import CpuFacts, choose_cpu_dtype, choose_dtype, cpu_facts

AMD_AVX2 = CpuFacts("AMD EPYC 7B13", ("avx2", "fma"), 2, 2, torch.__version__, "x86_64")
INTEL_AMX = CpuFacts("Intel(R) Xeon(R) Platinum 8481C", ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"),
                     2, 2, torch.__version__, "x86_64")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_CACHE_DIR", str(tmp_path / "cache"))


def test_cpu_without_fast_bf16_gets_fp32():
    # the AMD EPYC figures: 218 ms fp32 vs 11,566 ms bf16 for a 2048x576 @ 576x4608 matmul
    choice = choose_cpu_dtype(576, benchmark=lambda width: (218.0, 11566.0), facts=AMD_AVX2)
    assert choice.dtype == "float32" and choice.torch_dtype == torch.float32
    assert choice.source == "benchmark" and "53.1x slower" in choice.reason
    assert choice.bf16_speedup == pytest.approx(218 / 11566)


def test_cpu_with_fast_bf16_gets_bf16_and_a_near_tie_stays_fp32():
    assert choose_cpu_dtype(576, benchmark=lambda width: (3.2, 0.8), facts=INTEL_AMX).dtype == "bfloat16"
    tie = choose_cpu_dtype(576, benchmark=lambda width: (1.0, 0.9), facts=INTEL_AMX)
    assert tie.dtype == "float32" and "not worth" in tie.reason


def test_flags_decide_when_the_benchmark_cannot_run():
    def broken(width):
        raise RuntimeError("no bf16 kernels in this build")

    amd = choose_cpu_dtype(576, benchmark=broken, facts=AMD_AVX2)
    intel = choose_cpu_dtype(576, benchmark=broken, facts=INTEL_AMX)
    assert (amd.dtype, amd.source) == ("float32", "flags") and "no bf16 kernels" in amd.reason
    assert (intel.dtype, intel.source) == ("bfloat16", "flags")


def test_measured_once_per_machine_then_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(machine, "benchmark_cpu", lambda width: calls.append(width) or (5.0, 100.0))
    first = choose_cpu_dtype(576)
    second = choose_cpu_dtype(576)
    assert (first.source, second.source) == ("benchmark", "cache") and calls == [576]
    assert first.dtype == second.dtype == "float32" and second.fp32_ms == 5.0
    choose_cpu_dtype(2304)  # another width is another measurement
    assert calls == [576, 2304]
    cache = tmp_path / "cache" / "cpu-dtype.json"
    assert len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")  # a corrupt cache is measured again, not an error
    assert choose_cpu_dtype(576).source == "benchmark" and calls == [576, 2304, 576]


def test_unwritable_cache_only_costs_a_measurement(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SAESCOPE_CACHE_DIR", str(blocker / "sub"))  # a path under a regular file
    monkeypatch.setattr(machine, "benchmark_cpu", lambda width: (1.0, 0.5))
    assert choose_cpu_dtype(576).dtype == "bfloat16"


def test_real_benchmark_is_short_and_agrees_with_itself():
    choice = choose_dtype(torch.device("cpu"), 64, use_cache=False)
    assert choice.dtype in ("float32", "bfloat16") and choice.source == "benchmark"
    assert choice.fp32_ms > 0 and choice.bf16_ms > 0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA caps below are x86 settings")
def test_avx2_only_cpu_measures_fp32(tmp_path):
    """With torch's and oneDNN's kernels capped at AVX2 (as on an AMD EPYC without AVX-512) bf16 is emulated,
    whatever the flags say, and the real micro-benchmark picks fp32."""
    code = "from engine.model.machine import choose_cpu_dtype; c = choose_cpu_dtype(576); print(c.dtype, c.bf16_speedup)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_WAIT_POLICY": "PASSIVE",
           "SAESCOPE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    dtype, speedup = out.stdout.split()
    assert dtype == "float32" and float(speedup) < 0.5


def test_cpu_facts_name_the_cpu():
    facts = cpu_facts()
    assert facts.model and facts.threads >= 1 and facts.torch == torch.__version__
    assert set(facts.flags) <= set(machine.ISA_FLAGS)
    assert facts.to_dict()["flags"] == list(facts.flags)
