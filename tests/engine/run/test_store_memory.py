"""A run's DuckDB connection has a memory cap (default ``MEMORY_LIMIT``, ``$SAESCOPE_DUCKDB_MEMORY_LIMIT`` or
``RunStore.open(memory_limit=...)``): a query that needs more fails with DuckDB's out-of-memory error instead of
taking 80% of the machine (DuckDB's own default, per connection)."""

from __future__ import annotations

import duckdb
import pytest

from engine.precompute.pipeline import precompute
from engine.run.index import cursor
from engine.run.store import MEMORY_LIMIT, MEMORY_LIMIT_ENV, RunStore
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

HEAVY = "SELECT count(*) FROM (SELECT i FROM range(4000000) t(i) ORDER BY random())"
"""A sort of 4M rows: about 60 MB of DuckDB's memory."""


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("store_memory")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=10)
    precompute(tiny_llama, random_sae("topk"), corpus, root / "run", context_len=16, batch_size=8, sample_contexts=2,
               progress=False)
    return root / "run"


def _limit(store: RunStore) -> int:
    row = cursor(store._con).execute("SELECT current_setting('memory_limit')").fetchone()
    assert row is not None
    number, unit = row[0].split()
    return int(float(number) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])


def test_the_default_cap(run_dir, monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    with RunStore.open(run_dir) as store:
        assert MEMORY_LIMIT == "1GB" and abs(_limit(store) - 10**9) < 2**20
        assert store.n_features() > 0


def test_a_query_past_the_cap_fails_and_the_store_goes_on(run_dir, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "16MB")
    with RunStore.open(run_dir) as store:
        assert abs(_limit(store) - 16 * 10**6) < 2**20
        with pytest.raises(duckdb.OutOfMemoryException, match="Out of Memory"):
            cursor(store._con).execute(HEAVY).fetchone()
        with pytest.raises(duckdb.Error, match="lock_configuration|locked"):  # a statement cannot lift it
            cursor(store._con).execute("SET memory_limit = '10GB'")
        assert store.feature(0) is not None  # the store still answers
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    with RunStore.open(run_dir, memory_limit="200MB") as store:  # the argument wins
        assert abs(_limit(store) - 200 * 10**6) < 2**20
        assert cursor(store._con).execute(HEAVY).fetchone() == (4000000,)


def test_a_bad_setting_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=f"\\${MEMORY_LIMIT_ENV}='lots' is not a memory size DuckDB reads"):
        RunStore.open(run_dir)
