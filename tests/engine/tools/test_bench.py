"""The benchmark's parts on small inputs: the synthetic store goes through the real writer and index, the query
timing, and (slow) the whole ``saescope bench`` on the tiny model."""

import json
import statistics
import types

import pyarrow.parquet as pq
import pytest

from engine.cli import main
from engine.run import schema
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
    densities = pq.read_table(path / schema.FEATURES, columns=["density"])["density"].to_pylist()
    assert len(densities) == 3000
    assert [t.density for t in top] == sorted(densities, reverse=True)[:50]  # the 50 densest, by brute force


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks, written out."""
    s = sorted(values)
    h = (len(s) - 1) * q / 100
    lo = int(h)
    return s[lo] if lo + 1 == len(s) else s[lo] + (h - lo) * (s[lo + 1] - s[lo])


def test_query_bench_reports_latencies(tmp_path, monkeypatch):
    """The reported p95 and median are those of the timed queries (after 20 warm-up ones), measured with a clock that
    each real store query advances by a known number of milliseconds; the queries answer real pages."""
    from engine.tools import bench

    clock = [0.0]
    taken: dict[str, list[float]] = {"feature": [], "top_features": []}
    answers: dict[str, list] = {"feature": [], "top_features": []}

    def timed(name, ms_of):
        real = getattr(RunStore, name)

        def query(self, *args, **kwargs):
            answers[name].append(real(self, *args, **kwargs))
            ms = ms_of(len(taken[name]))
            taken[name].append(ms)
            clock[0] += ms / 1e3
            return answers[name][-1]

        monkeypatch.setattr(RunStore, name, query)

    # slow cold queries during the warm-up, then 1..13 ms (and 0.25..4.25 ms) in a scrambled order
    timed("feature", lambda i: 50.0 + i if i < 20 else 1.0 + (i * 7) % 13)
    timed("top_features", lambda i: 40.0 - i if i < 20 else 0.25 * (1 + (i * 5) % 17))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    out = query_bench(tmp_path / "s", n=30, n_features=2000, n_contexts=300, vocab=200)

    assert len(taken["feature"]) == len(taken["top_features"]) == 20 + 30
    assert all(page is not None for page in answers["feature"]) and {len(t) for t in answers["top_features"]} == {50}
    for name, key in (("feature", "feature_query"), ("top_features", "topn_query")):
        timed_ms = taken[name][20:]
        assert out[f"{key}_p95_ms"] == pytest.approx(percentile(timed_ms, 95), rel=1e-9), name
        assert out[f"{key}_median_ms"] == pytest.approx(statistics.median(timed_ms), rel=1e-9), name
    assert out["store"] == {"path": str(tmp_path / "s"), "latents": 2000, "examples_per_latent": 20, "tokens_per_example": 64,
                            "prepare_seconds": 0.0}


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


def test_refresh_bench_applies_a_batch_and_agrees_with_a_full_build(tmp_path):
    from engine.tools.bench_search import format_refresh, refresh_bench

    out = refresh_bench(1200, 16, 8, root=tmp_path, ivf_min=1000, n_lists=8)
    assert out["index"] == "ivf" and out["same_best"] and out["same_index_ids"]
    assert out["interp_db"]["applied_s"] > 0 and out["search_index"]["full_s"] > 0
    assert "applied" in "\n".join(format_refresh(out)) and not any(tmp_path.iterdir())  # the run is removed
