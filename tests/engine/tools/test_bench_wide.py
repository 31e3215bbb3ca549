"""The wide bench's kernel comparison at toy size: both sides run on the same data and agree."""

import pytest

from engine.tools.bench_wide import kernels


def test_kernels_compare_like_with_like():
    out = kernels(d_sae=8192, d_in=16, tokens=8, k=8, repeats=1, neighbor_rows=3000, dtype="float32")
    assert out["dtype"] == "float32" and out["d_sae"] == 8192
    assert out["topk_over_wide_topk"] == pytest.approx(out["topk_cpu_seconds"] / out["wide_topk_cpu_seconds"])
    assert 0.0 <= out["ivf"]["recall_at_10"] <= 1.0 and 0 < out["ivf"]["pairs_compared"] < 1
    assert out["reservoir_acts_gb"] == {"whole_contexts": 8192 * 120 * 128 * 2 / 1e9, "window_32": 8192 * 120 * 32 * 2 / 1e9}
