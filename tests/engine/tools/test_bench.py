"""The benchmark's parts on small inputs: the synthetic store goes through the real writer and index, the query
timing, and (slow) the whole ``saescope bench`` on the tiny model."""

import json

import pytest

from engine.cli import main
from engine.run.store import RunStore
from engine.tools.bench import format_report, query_bench
from engine.tools.bench_live import check_live
from engine.tools.synthetic import ensure_bench_store


def test_synthetic_store_is_a_readable_run(tmp_path):
    params = {"n_features": 3000, "n_contexts": 500, "vocab": 300}
    path = ensure_bench_store(tmp_path / "store", **params)
    index_mtime = (path / "index.duckdb").stat().st_mtime
    assert ensure_bench_store(tmp_path / "store", **params) == path  # cached
    assert (path / "index.duckdb").stat().st_mtime == index_mtime
    with RunStore.open(path) as store:
        assert store.n_features() == 3000
        page = store.feature(2999)
        assert page is not None and len(page.examples) == 20
        assert all(len(e.acts) == len(e.tokens) == 64 for e in page.examples)
        top = store.top_features(sort_by="density", limit=50)
        assert len(top) == 50 and top[0].density >= top[-1].density


def test_query_bench_reports_latencies(tmp_path):
    out = query_bench(tmp_path / "s", n=30, n_features=2000, n_contexts=300, vocab=200)
    assert out["feature_query_p95_ms"] > 0 and out["topn_query_p95_ms"] > 0 and out["store"]["latents"] == 2000


@pytest.mark.slow
def test_bench_command_on_tiny_model(tmp_path, capsys):
    code = main(["bench", "--json", "--tiny", "--tokens", "8192", "--no-queries"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("precompute_over_forward", "ce_sample_seconds", "peak_rss_mb", "model"):
        assert key in result
    assert result["model"].startswith("tiny") and len(result["peak_rss_mb"]) == 2
    # the live figures come back from the child as numbers (a failure there fails the bench instead)
    check_live(result["live"])
    assert result["live"]["lens_tokens"] == 128
    report = format_report(result)
    assert "precompute / forward" in report and "live lens_over_forward" in report


def test_search_bench_measures_every_filter_and_the_recall_of_its_index(tmp_path):
    from engine.tools.bench_search import format as format_search
    from engine.tools.bench_search import search_bench

    out = search_bench(4000, 32, k=20, n_queries=30, n_recall=10, ivf_min=1000, n_lists=16, n_probe=4, embed=False,
                       cache=tmp_path)
    assert out["index"] == "ivf" and out["index_built_now"] and out["n"] == 4000
    modes = out["modes"]
    assert set(modes) == {"none", "density_10pct", "density_1pct", "density_50pct_score"}
    assert modes["none"]["kept"] == 4000 and 300 <= modes["density_10pct"]["kept"] <= 500
    for m in modes.values():
        assert 0 < m["p50_ms"] <= m["p95_ms"] and 0.0 <= m["recall@20"] <= 1.0
    assert modes["none"]["recall@20"] > 0.5  # 4 of 16 lists probed on clustered data
    again = search_bench(4000, 32, k=20, n_queries=5, n_recall=5, ivf_min=1000, n_lists=16, n_probe=4, embed=False,
                         cache=tmp_path)
    assert not again["index_built_now"]  # the index is built once and reused
    lines = format_search(out)
    assert lines[0].startswith("search by meaning: 4,000 latents x 32 (ivf") and any("density_10pct" in ln for ln in lines)
