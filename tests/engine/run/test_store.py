"""The DuckDB query layer over a tiny run: page data, search (hostile text is data), sorting, errors, threads."""

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.precompute.pipeline import precompute
from engine.run import schema, sql
from engine.run.index import building, cursor, open_read_only
from engine.run.rows import ContextErrors, DarkMatterSummary, Example, FeatureRow, FeatureSummary, RunMetrics, TokenRow
from engine.run.store import RunStore
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

HOSTILE = ["'; DROP TABLE features; --", "%", "_", "'", '"', "\\", "%' OR '1'='1", "$text", "?", "\x00", "ǘ🙂", " " * 3]


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=20)
    out = root / "run"
    precompute(tiny_llama, random_sae("topk"), corpus, out, context_len=16, batch_size=8, sample_contexts=4, progress=False)
    return out


@pytest.fixture(scope="module")
def store(run_dir):
    with RunStore.open(run_dir) as s:
        yield s


def test_feature_page_data(store, run_dir):
    features = pq.read_table(run_dir / "features.parquet").to_pylist()
    latent = max(features, key=lambda r: r["fire_count"])["feature_id"]
    page = store.feature(latent)
    assert isinstance(page, FeatureRow)
    assert {k: getattr(page, k) for k in features[latent]} == features[latent]
    examples = page.examples
    kinds = [e.kind for e in examples]
    assert kinds == sorted(kinds, key=lambda k: k != "top") and "quantile" in kinds
    top = [e for e in examples if e.kind == "top"]
    assert [e.rank for e in top] == list(range(len(top)))
    assert [e.max_act for e in top] == sorted((e.max_act for e in top), reverse=True)
    contexts = {r["context_id"]: r["token_ids"] for r in pq.read_table(run_dir / "contexts.parquet").to_pylist()}
    examples_table = [r for r in pq.read_table(run_dir / "examples.parquet").to_pylist() if r["feature_id"] == latent]
    for e, want in zip(examples, examples_table, strict=True):
        del want["feature_id"]
        assert isinstance(e, Example) and {k: getattr(e, k) for k in want} == want
        assert e.token_ids == contexts[e.context_id][e.start : e.start + len(e.acts)]
        assert e.tokens == store.decode(e.token_ids) and len(e.tokens) == len(e.acts)
        assert type(e.acts) is list and type(e.token_ids) is list
    assert store.feature(10**6) is None
    assert store.examples(latent, kind="quantile") == [e for e in examples if e.kind == "quantile"]


def test_row_types_match_the_parquet_schema():
    assert FeatureRow._fields == (*schema.FEATURES_SCHEMA.names, "examples")
    assert FeatureSummary._fields[: len(sql.SUMMARY_COLUMNS)] == sql.SUMMARY_COLUMNS
    assert Example._fields[:8] == tuple(n for n in schema.EXAMPLES_SCHEMA.names if n != "feature_id")
    assert TokenRow._fields == (*schema.TOKENS_SCHEMA.names, "token")


def test_top_features_sort_and_filter(store):
    dens = store.densities()
    assert len(dens) == store.n_features() == 256 and dens.dtype == np.float64
    rows = store.top_features(sort_by="density", limit=10)
    assert all(isinstance(r, FeatureSummary) and r.fires_on is None for r in rows)
    assert [r.density for r in rows] == sorted(dens, reverse=True)[:10]
    rows = store.top_features(sort_by="max_act", descending=False, min_density=0.01, max_density=0.05, limit=500)
    assert rows and all(0.01 <= r.density <= 0.05 for r in rows)
    assert [r.max_act for r in rows] == sorted(r.max_act for r in rows)
    assert len(rows) == int(((dens >= 0.01) & (dens <= 0.05)).sum())
    page2 = store.top_features(sort_by="feature_id", descending=False, limit=5, offset=5)
    assert [r.feature_id for r in page2] == [i for i in range(256) if dens[i] > 0][5:10]
    with pytest.raises(ValueError, match="sort_by"):
        store.top_features(sort_by="density; DROP TABLE features")


@pytest.mark.parametrize("key", ["density", "max_act", "fire_count", "mean_act", "feature_id"])
@pytest.mark.parametrize("descending", [True, False])
def test_every_sort_order_matches_python(store, run_dir, key, descending):
    rows = pq.read_table(run_dir / "features.parquet").to_pylist()
    lo, hi = 0.005, 0.08
    kept = [r for r in rows if not r["dead"] and lo <= r["density"] <= hi]
    sign = -1 if descending else 1
    want = [r["feature_id"] for r in sorted(kept, key=lambda r: (sign * r[sql.ORDER_COLUMN[key]], r["feature_id"]))]
    got = store.top_features(sort_by=key, descending=descending, min_density=lo, max_density=hi, limit=40, offset=3)
    assert [r.feature_id for r in got] == want[3:43]
    everything = store.top_features(sort_by=key, descending=descending, include_dead=True, limit=1000)
    assert len(everything) == len(rows)


def test_search_by_label_token_and_id(store):
    some = store.top_features(limit=1)[0]
    word = some.label.split(" / ")[0]
    assert some.feature_id in [r.feature_id for r in store.search(word.upper(), by="label", limit=500)]
    hits = store.search(word, by="token", limit=500)
    assert hits and all(r.fires_on or r.promotes for r in hits)
    assert some.feature_id in [r.feature_id for r in hits]
    assert [r.feature_id for r in store.search("#7", by="id")] == [7]
    assert store.search("#7", by="id")[0] == store.top_features("feature_id", False, include_dead=True, offset=7, limit=1)[0]
    assert store.search("seven", by="id") == [] and store.search("99999999999", by="id") == []
    with pytest.raises(ValueError, match="search mode"):
        store.search("x", by="sql")


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("by", ["label", "token", "id"])
def test_hostile_search_text_is_data(store, text, by):
    rows = store.search(text, by=by)
    assert isinstance(rows, list)
    if text in ("%", "_", "%' OR '1'='1") and by == "label":
        assert all(text.lower() in r.label.lower() for r in rows)  # literal, not a wildcard
    assert store.n_features() == 256  # nothing dropped


def test_tokens_error_rows_and_worst_contexts(store, run_dir):
    rows = store.token_rows(order_by="err_norm", limit=5)
    assert all(isinstance(r, TokenRow) for r in rows)
    assert [r.err_norm for r in rows] == sorted((r.err_norm for r in rows), reverse=True)
    assert all(r.token == store.decode([r.token_id])[0] for r in rows)
    table = {(r["context_id"], r["position"]): r for r in pq.read_table(run_dir / "tokens.parquet").to_pylist()}
    assert all(r._asdict() == {**table[r.context_id, r.position], "token": r.token} for r in rows)
    worst = store.worst_contexts(2)
    assert worst and all(isinstance(c, ContextErrors) for c in worst)
    assert len(worst[0].err_norms) == len(worst[0].tokens) == len(worst[0].token_ids) == 16
    assert worst[0].err_norms[0] is None  # position 0 is excluded
    assert worst[0].mean_err_norm >= worst[-1].mean_err_norm
    first = worst[0]
    assert [first.err_norms[p] for p in first.positions] == [table[first.context_id, p]["err_norm"] for p in first.positions]
    with pytest.raises(ValueError, match="order_by"):
        store.token_rows(order_by="err_norm DESC; --")


def test_run_level_data(store, run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert store.manifest() == manifest
    assert store.metrics() == RunMetrics(**manifest["metrics"])  # every key of the section is a field
    dark = store.dark_matter()
    assert dark == DarkMatterSummary(**manifest["dark_matter"]) and dark.n_train_tokens > 0
    snap = store.snapshot()
    assert snap.final and store.is_final() and snap.n_tokens == manifest["corpus"]["n_tokens"]
    context = store.context(3)
    assert context is not None and context.context_id == 3 and len(context.token_ids) == 16
    assert context.tokens == store.decode(context.token_ids) and store.context(10**6) is None
    W, b = store.linear_map()
    assert tuple(W.shape) == (64, 64) and tuple(b.shape) == (64,)
    assert store.decode([0, 10**7])[1] == "<id 10000000>"
    assert store.dead_ids() == manifest["dead_latents"]


def test_connection_is_read_only_without_file_access(store, tmp_path):
    con = cursor(store._con)
    with pytest.raises(Exception, match="read-only"):
        con.execute("CREATE TABLE t (a INTEGER)")
    with pytest.raises(Exception, match="disabled"):
        con.execute("SELECT * FROM read_csv($p)", {"p": str(tmp_path / "x.csv")})
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")


def test_a_rebuilt_database_is_read_fresh_while_an_older_connection_is_open(tmp_path):
    """DuckDB shares one instance per path in a process: a plain connect would read the replaced file's old
    contents through a connection still open (the app keeps stores open while a run or its explanations change)."""
    target = tmp_path / "x.duckdb"
    for value in (1, 2):
        with building(target) as con:
            con.execute(f"CREATE TABLE t AS SELECT {value} AS v")
        if value == 1:
            old = open_read_only(target)
    new = open_read_only(target)
    assert cursor(old).execute("SELECT v FROM t").fetchall() == [(1,)]
    assert cursor(new).execute("SELECT v FROM t").fetchall() == [(2,)]
    old.close()
    new.close()


def test_sql_is_named_constants_with_bound_parameters():
    # public constants; _TEMPLATES are filled from allow-lists
    for name in (n for n in dir(sql) if n.isupper() and not n.startswith("_")):
        value = getattr(sql, name)
        statements = value.values() if isinstance(value, dict) else [value]
        for text in statements:
            if isinstance(text, str) and "SELECT" in text:
                assert "{" not in text, name


def test_open_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        RunStore.open(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="half.*no complete saescope run"):
        RunStore.open(tmp_path / "half")


def test_missing_index_is_rebuilt(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "index.duckdb").unlink()
    with RunStore.open(copy) as s:
        assert s.n_features() == 256 and (copy / "index.duckdb").is_file()


def test_shared_between_threads(store):
    ids = [r.feature_id for r in store.top_features(limit=16)]
    expected = {i: store.feature(i) for i in ids}
    errors = []

    def work():
        try:
            for _ in range(5):
                for i in ids:
                    assert store.feature(i) == expected[i]
                store.search("the", by="token")
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_index_of_another_version_is_rebuilt(run_dir, tmp_path):
    import shutil

    import duckdb

    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    with duckdb.connect(str(copy / "index.duckdb")) as con:
        con.execute("DROP TABLE index_info")
        con.execute("DROP TABLE features_by_density_desc")
    with RunStore.open(copy) as s:
        assert len(s.top_features(limit=3)) == 3


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_iter_features_is_feature_for_every_latent(store, batch_size):
    every = list(store.iter_features(batch_size=batch_size))
    assert [row.feature_id for row in every] == list(range(store.n_features()))
    assert every == [store.feature(i) for i in range(store.n_features())]
    assert any(row.examples for row in every) and any(ex.kind == "quantile" for row in every for ex in row.examples)


def test_top_features_of_a_latent_range_and_the_l0_sample(store, run_dir):
    """A Matryoshka group filter: ids in [start, stop) only, sorted as the whole list; per-token L0 of the sample."""
    rows = pq.read_table(run_dir / "features.parquet").to_pylist()
    group = [r for r in rows if 40 <= r["feature_id"] < 100 and not r["dead"]]
    want = sorted(group, key=lambda r: (-r["density"], r["feature_id"]))
    got = store.top_features(sort_by="density", latents=range(40, 100), limit=500)
    assert [r.feature_id for r in got] == [r["feature_id"] for r in want] and got
    tokens = pq.read_table(run_dir / "tokens.parquet").column("l0").to_numpy()
    np.testing.assert_array_equal(np.sort(store.l0_sample()), np.sort(tokens[~np.isnan(tokens.astype(float))].astype(np.int64)))
