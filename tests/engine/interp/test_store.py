"""InterpStore (explanations and scores through interp.duckdb) and search by meaning (exact and IVF)."""

import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from engine.interp import index as index_mod
from engine.interp import parts, schema, scorers
from engine.interp import store as store_mod
from engine.interp import vectors as vectors_mod
from engine.interp.search import SemanticSearch, VectorIndex, unit
from engine.interp.sql import INTERP_DB
from engine.interp.store import InterpStore
from engine.run import schema as run_schema
from engine.run.parquet import write_table
from engine.tools.bench_search import synthetic_queries, synthetic_vectors

T0 = datetime(2025, 1, 1, tzinfo=UTC)
HOSTILE = ["'; DROP TABLE explanations; --", "%' OR '1'='1", "$feature_id", "\\", '"quoted"', "ǘ🙂 ‮rtl", "a\nb\tc",
           "\x00nul", "?", " " * 3, "x" * 2000]


def write_features(run, densities):
    n = len(densities)
    empty_i, empty_f = [[] for _ in range(n)], [[] for _ in range(n)]
    write_table(run / run_schema.FEATURES, {
        "feature_id": np.arange(n), "fire_count": np.zeros(n, np.int64), "density": np.asarray(densities, np.float64),
        "max_act": np.ones(n, np.float32), "mean_act": np.ones(n, np.float32), "dead": np.zeros(n, bool),
        "hist_counts": empty_i, "hist_edges": empty_f, "top_logit_ids": empty_i, "top_logit_values": empty_f,
        "bottom_logit_ids": empty_i, "bottom_logit_values": empty_f, "neighbor_ids": empty_i, "neighbor_cos": empty_f,
        "top_token_ids": empty_i, "label": [""] * n, "explanation": [None] * n,
    }, run_schema.FEATURES_SCHEMA)


def ex_rows(rows):
    """rows: (feature_id, explainer, text, status, seconds after T0)."""
    return pa.table({
        "feature_id": [r[0] for r in rows], "explanation": [r[2] for r in rows], "explainer": [r[1] for r in rows],
        "prompt_version": ["v1"] * len(rows), "created_at": [T0 + timedelta(seconds=r[4]) for r in rows],
        "status": [r[3] for r in rows], "reason": ["" if r[3] == "ok" else "junk" for r in rows],
    }, schema=schema.EXPLANATIONS_SCHEMA)


def details(labels, values, key="probabilities"):
    out = {"context_ids": [100 + i for i in range(len(labels))], "labels": labels, key: values}
    if key == "probabilities":
        out["auroc"] = scorers.auroc(np.array(labels, bool), np.array(values))
    return json.dumps(out)


def sc_rows(rows):
    """rows: (feature_id, explainer, scorer, score, details or None)."""
    return pa.table({
        "feature_id": [r[0] for r in rows], "explainer": [r[1] for r in rows], "prompt_version": ["v1"] * len(rows),
        "scorer": [r[2] for r in rows], "score": [r[3] for r in rows], "n_examples": [4] * len(rows),
        "details": [r[4] if r[4] is not None else "{}" for r in rows],
    }, schema=schema.SCORES_SCHEMA)


def emb_rows(rows, model="mini"):
    """rows: (feature_id, explainer, vector)."""
    return pa.table({
        "feature_id": [r[0] for r in rows], "explainer": [r[1] for r in rows], "prompt_version": ["v1"] * len(rows),
        "model": [model] * len(rows),
        "embedding": [None if r[2] is None else np.asarray(r[2], np.float32).tolist() for r in rows],
    }, schema=schema.EMBEDDINGS_SCHEMA)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_features(run, np.linspace(0.0, 0.1, 10))
    parts.write_part(run, {
        schema.EXPLANATIONS: ex_rows([
            (1, "A", "a one", "ok", 0), (1, "B", "b one", "ok", 0), (1, "baseline:shuffled", "shuffled", "ok", 0),
            (2, "A", "a two", "ok", 0), (2, "B", "b two newer", "ok", 5),
            (3, "A", None, "failed", 0), (3, "baseline:top-tokens", "tokens", "ok", 0),
            (4, "A", "a four unscored", "ok", 0), (4, "B", None, "failed", 0),
        ]),
        schema.SCORES: sc_rows([
            (1, "A", "detection", 0.6, None), (1, "A", "fuzzing", 0.8, None),
            (1, "B", "detection", 0.9, None), (1, "B", "fuzzing", None, None),
            (1, "baseline:shuffled", "detection", 0.95, None),
            (2, "A", "detection", 0.7, None), (2, "B", "detection", 0.7, None),
            (3, "baseline:top-tokens", "detection", 0.99, None),
        ]),
    })
    parts.consolidate(run)
    return run


def test_best_explanation_and_order(run):
    with InterpStore.open(run) as st:
        assert (run / INTERP_DB).is_file()
        one = st.explanations(1)
        # best first by mean of the available scores: baseline 0.95, B 0.9 (fuzzing undefined), A 0.7
        assert [(e.explainer, e.mean_score) for e in one] == [("baseline:shuffled", 0.95), ("B", 0.9), ("A", pytest.approx(0.7))]
        assert one[1].scores == {"detection": 0.9, "fuzzing": None} and one[1].n_examples == {"detection": 4, "fuzzing": 4}
        assert one[0].is_baseline and not one[1].is_baseline
        assert one[1].created_at == T0
        best = st.best([1, 2, 3, 4, 99])
        assert set(best) == {1, 2, 4}  # 3: only a failed explanation and a baseline; 99: nothing
        assert (best[1].explainer, best[1].text) == ("B", "b one")  # the baseline scores higher but never counts
        assert (best[2].explainer, best[2].text) == ("B", "b two newer")  # tie at 0.7: the newer one
        assert (best[4].explainer, best[4].mean_score) == ("A", None)  # unscored but usable beats failed
        assert st.best() == best
        three = st.explanations(3)
        assert [(e.explainer, e.status, e.text) for e in three] == [("baseline:top-tokens", "ok", "tokens"),
                                                                    ("A", "failed", None)]
        assert three[1].reason == "junk"


def test_best_ranks_by_the_one_score_every_candidate_has(tmp_path):
    """A batch explanation with detection, fuzzing and embedding against a live one scored by embedding alone: they
    compete on embedding AUROC (the mean of unlike scores would favour whichever has fewer); the intruder score is
    the latent's and never ranks."""
    run = tmp_path / "run"
    run.mkdir()
    write_features(run, np.linspace(0.0, 0.1, 4))
    parts.write_part(run, {
        schema.EXPLANATIONS: ex_rows([(1, "batch", "batch one", "ok", 0), (1, "live", "live one", "ok", 9),
                                      (2, "batch", "batch two", "ok", 0), (2, "other", "other two", "ok", 9),
                                      (3, "batch", "batch three", "ok", 0), (3, "live", "live three", "ok", 9)]),
        schema.SCORES: sc_rows([
            (1, "batch", "detection", 0.55, None), (1, "batch", "fuzzing", 0.6, None), (1, "batch", "embedding", 0.9, None),
            (1, "batch", "intruder", 0.2, None), (1, "live", "embedding", 0.8, None), (1, "live", "intruder", 1.0, None),
            (2, "batch", "detection", 0.7, None), (2, "batch", "embedding", 0.6, None),
            (2, "other", "detection", 0.65, None), (2, "other", "embedding", 0.95, None),
            (3, "batch", "detection", 0.9, None),
        ]),
    })
    with InterpStore.open(run) as st:
        one = st.explanations(1)
        # means: batch (0.55 + 0.6 + 0.9) / 3 = 0.683 < live 0.8; on the shared embedding AUROC batch wins, 0.9 > 0.8
        assert [(e.explainer, e.rank_scorer, e.rank_score) for e in one] == [("batch", "embedding", 0.9),
                                                                             ("live", "embedding", 0.8)]
        assert one[0].mean_score == pytest.approx((0.55 + 0.6 + 0.9) / 3) and one[1].mean_score == pytest.approx(0.8)
        assert one[1].scores["intruder"] == 1.0, "shown, but neither averaged nor ranked"
        best = st.best([1, 2, 3])
        assert best[1].explainer == "batch"
        assert (best[2].explainer, best[2].rank_scorer) == ("batch", "detection"), "detection first when all have it"
        # 3: nothing shared (live is unscored): scored before unscored, whatever the age
        assert (best[3].explainer, best[3].rank_scorer) == ("batch", None)


def test_threads_share_one_store(run):
    with InterpStore.open(run) as st:
        want = {f: st.explanations(f) for f in range(1, 5)}
        want_best = st.best([1, 2, 4])
        errors, results = [], []

        def worker(seed):
            try:
                for f in np.random.default_rng(seed).integers(1, 5, 40):
                    results.append(st.explanations(int(f)) == want[int(f)] and st.best([1, 2, 4]) == want_best)
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(results) == 320 and all(results)


def test_scores_details_parsed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    det = details([1, 1, 1, 0, 0, 0], [0.9, 0.4, 0.7, 0.2, 0.6, 0.1])
    emb = details([1, 1, 0, 0], [0.8, 0.3, 0.5, 0.1], key="similarities")
    parts.write_part(run, {schema.EXPLANATIONS: ex_rows([(7, "A", "x", "ok", 0)]),
                             schema.SCORES: sc_rows([(7, "A", "detection", 0.6667, det), (7, "A", "embedding", 0.75, emb)])})
    with InterpStore.open(run) as st:
        got = {s.scorer: s for s in st.scores(7, "A")}
        assert set(got) == {"detection", "embedding"}
        d = got["detection"]
        assert [e.context_id for e in d.wrong] == [101, 104]  # activating at p=0.4, non-activating at p=0.6
        assert [e.context_id for e in d.missed] == [101] and [e.context_id for e in d.false_alarms] == [104]
        assert [e.predicted for e in d.excerpts] == [True, False, True, False, True, False]
        labels, probs = np.array([1, 1, 1, 0, 0, 0], bool), np.array([0.9, 0.4, 0.7, 0.2, 0.6, 0.1])
        assert d.auroc == pytest.approx(scorers.auroc(labels, probs))
        e = got["embedding"]
        # activating 0.3 ranks below non-activating 0.5: both are wrong, each misordered against one excerpt
        assert [(x.context_id, x.misordered, x.wrong, x.predicted) for x in e.excerpts] == [
            (100, 0, False, None), (101, 1, True, None), (102, 1, True, None), (103, 0, False, None)]
        assert e.auroc == pytest.approx(0.75) and e.score == 0.75
        assert st.scores(7, "B") == [] and st.scores(8, "A") == []


def test_run_without_explanations(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    write_features(run, [0.1, 0.2])
    with InterpStore.open(run) as st:
        assert st.explanations(0) == [] and st.best([0, 1]) == {} and st.scores(0, "A") == []
        summary = st.summary()
        assert (summary.n_explanations, summary.n_best, summary.explainers) == (0, 0, ())
    assert not (run / INTERP_DB).exists()
    with SemanticSearch.open(run) as search:
        assert len(search) == 0 and search.search(np.ones(4, np.float32)) == []
    with pytest.raises(FileNotFoundError):
        InterpStore.open(tmp_path / "missing")


def test_parts_visible_newest_wins_and_rebuild(run):
    redo = ex_rows([(5, "A", "pending five", "ok", 9), (2, "A", "a two redone", "ok", 9)])
    parts.write_part(run, {schema.EXPLANATIONS: redo, schema.SCORES: sc_rows([(2, "A", "detection", 0.95, None)])})
    (parts.parts_dir(run) / ".tmp-writing").mkdir()  # a batch another process is writing now: left alone
    with InterpStore.open(run) as st:
        assert st.best([5])[5].text == "pending five"
        assert (st.best([2])[2].text, st.best([2])[2].mean_score) == ("a two redone", 0.95)
        assert not st.stale()
        parts.write_part(run, {schema.EXPLANATIONS: ex_rows([(6, "A", "six", "ok", 10)])})
        assert st.stale() and st.best([6]) == {}
    assert (parts.parts_dir(run) / ".tmp-writing").is_dir()
    with InterpStore.open(run) as st:
        assert st.best([6])[6].text == "six"
        before = {f: e.text for f, e in st.best().items()}
    built = (run / INTERP_DB).stat().st_mtime_ns
    with InterpStore.open(run) as st:  # nothing changed: not rebuilt
        assert st.best()[6].text == "six"
    assert (run / INTERP_DB).stat().st_mtime_ns == built
    (parts.parts_dir(run) / ".tmp-writing").rmdir()
    parts.consolidate(run)
    with InterpStore.open(run) as st:
        assert {f: e.text for f, e in st.best().items()} == before


def test_summary_means(run):
    with InterpStore.open(run) as st:
        s = st.summary()
        by = {e.explainer: e for e in s.explainers}
        assert set(by) == {"A", "B", "baseline:shuffled", "baseline:top-tokens"}
        assert by["A"].mean_scores == {"detection": pytest.approx((0.6 + 0.7) / 2), "fuzzing": pytest.approx(0.8)}
        assert by["A"].n_scored == {"detection": 2, "fuzzing": 1}
        assert (by["A"].n, by["A"].n_ok, by["A"].n_failed) == (4, 3, 1)
        assert by["B"].mean_scores == {"detection": pytest.approx(0.8), "fuzzing": None} and by["B"].n_scored["fuzzing"] == 0
        assert by["baseline:shuffled"].is_baseline and not by["B"].is_baseline
        assert (s.n_explanations, s.n_latents, s.n_best, s.n_scores) == (9, 4, 3, 8)


def test_hostile_strings_round_trip(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [(i, h, h, "ok", i) for i, h in enumerate(HOSTILE)]
    det = details([1, 0], [0.9, 0.1])
    parts.write_part(run, {schema.EXPLANATIONS: ex_rows(rows),
                             schema.SCORES: sc_rows([(i, h, "detection", 0.5, det) for i, h in enumerate(HOSTILE)])})
    with InterpStore.open(run) as st:
        for i, h in enumerate(HOSTILE):
            (e,) = st.explanations(i)
            assert (e.explainer, e.text) == (h, h)
            assert st.best([i])[i].text == h
            (s,) = st.scores(i, h)
            assert s.explainer == h and [x.context_id for x in s.excerpts] == [100, 101]
            assert st.scores(i, h + "x") == []
        assert st.texts([(i, h, "v1") for i, h in enumerate(HOSTILE)]) == {(i, h, "v1"): h for i, h in enumerate(HOSTILE)}
        assert len(st.summary().explainers) == len(HOSTILE)


def test_read_only_run_dir_builds_elsewhere(run, monkeypatch):
    real = os.access

    def access(path, mode):
        return False if mode == os.W_OK and str(path) == str(run) else real(path, mode)

    monkeypatch.setattr(store_mod.os, "access", access)
    monkeypatch.setattr(index_mod.tempfile, "gettempdir", lambda: str(run.parent / "tmp"))
    (run.parent / "tmp").mkdir()
    with InterpStore.open(run) as st:
        assert st.best([1])[1].explainer == "B"
        assert st.db_path is not None and st.db_path.parent.parent == run.parent / "tmp"
    assert not (run / INTERP_DB).exists()


# --- search by meaning --------------------------------------------------------------------------------------------
def search_run(tmp_path, n=3000, dim=32, seed=0):
    """A run whose latents each have an explanation by A (scored, embedded), some also by B (better, embedded or not)
    and a baseline (embedded: must never be indexed)."""
    rng = np.random.default_rng(seed)
    run = tmp_path / "srun"
    run.mkdir()
    density = 10 ** rng.uniform(-5, -1, n + 5)
    write_features(run, density)
    vecs_a = synthetic_vectors(n, dim, n_topics=64, n_super=8, seed=seed)
    vecs_b = synthetic_vectors(n, dim, n_topics=64, n_super=8, seed=seed + 1)
    score_a = rng.uniform(0.4, 0.8, n)
    has_b = rng.random(n) < 0.3
    b_embedded = has_b & (rng.random(n) < 0.5)
    ids = np.arange(n)
    for lo in range(0, n, 1000):  # one part per 1000 latents, left unconsolidated
        sl = slice(lo, lo + 1000)
        ex = [(int(i), "A", f"a{i}", "ok", 0) for i in ids[sl]] + [(int(i), "B", f"b{i}", "ok", 0) for i in ids[sl][has_b[sl]]]
        ex += [(int(i), "baseline:shuffled", f"s{i}", "ok", 0) for i in ids[sl]]
        sc = [(int(i), "A", "detection", float(score_a[i]), None) for i in ids[sl]]
        sc += [(int(i), "B", "detection", 0.9, None) for i in ids[sl][has_b[sl]]]
        sc += [(int(i), "baseline:shuffled", "detection", 0.99, None) for i in ids[sl]]
        emb = [(int(i), "A", vecs_a[i]) for i in ids[sl]] + [(int(i), "B", vecs_b[i]) for i in ids[sl][b_embedded[sl]]]
        emb += [(int(i), "baseline:shuffled", -vecs_a[i]) for i in ids[sl]]
        parts.write_part(run, {schema.EXPLANATIONS: ex_rows(ex), schema.SCORES: sc_rows(sc),
                                 schema.EMBEDDINGS: emb_rows(emb)})
    # the indexed vector: B's where B (the best) is embedded, else A's (B unembedded falls back to A)
    indexed = np.where(b_embedded[:, None], vecs_b, vecs_a)
    score = np.where(b_embedded, 0.9, score_a)
    return run, indexed, score, density[:n]


def brute(indexed, q, k, keep=None):
    sims = indexed @ unit(q)
    if keep is not None:
        sims = np.where(keep, sims, -np.inf)
    order = np.lexsort((np.arange(len(sims)), -sims))[:k]
    return [int(i) for i in order if np.isfinite(sims[i])]


def test_search_exact_matches_brute_force(tmp_path):
    run, indexed, score, density = search_run(tmp_path)
    queries = synthetic_queries(20, 32, n_topics=64, n_super=8, seed=0, query_seed=5)
    with SemanticSearch.open(run) as search:
        assert search.index is not None and not search.index.is_ivf and len(search) == len(indexed)
        for q in queries[:10]:
            hits = search.search(q, 20)
            assert [h.feature_id for h in hits] == brute(indexed, q, 20)
            assert [h.similarity for h in hits] == pytest.approx((indexed @ unit(q))[[h.feature_id for h in hits]], abs=1e-5)
            assert all(h.explainer in ("A", "B") and h.text == f"{h.explainer.lower()}{h.feature_id}" for h in hits)
        lo, hi = np.quantile(density, [0.3, 0.5])
        for q in queries[10:]:
            keep = (density >= lo) & (density <= hi)
            hits = search.search(q, 30, min_density=lo, max_density=hi)
            assert [h.feature_id for h in hits] == brute(indexed, q, 30, keep)
            assert all(lo <= h.density <= hi for h in hits)
            keep2 = keep & (score >= 0.7)
            hits = search.search(q, 30, min_density=lo, max_density=hi, min_score=0.7)
            assert [h.feature_id for h in hits] == brute(indexed, q, 30, keep2) and len(hits) == 30
            assert all(h.score >= 0.7 for h in hits)
            assert [h.feature_id for h in search.search(q, 25, min_score=0.85)] == brute(indexed, q, 25, score >= 0.85)
        assert search.search(queries[0], 10, min_density=1.0) == []  # nothing that dense
        assert search.search(queries[0], 10, min_density=0.2, max_density=0.1) == []
        with pytest.raises(ValueError, match="dimensions"):
            search.search(np.ones(5, np.float32))


def test_search_index_cached_and_invalidated(tmp_path):
    run, indexed, _, _ = search_run(tmp_path, n=500)
    root = run / schema.INTERP_DIR / "search"
    with SemanticSearch.open(run) as s1:
        assert s1.index is not None
        folder = s1.index.folder
        built = (folder / "meta.json").stat().st_mtime_ns
    with SemanticSearch.open(run) as s2:
        assert s2.index is not None and s2.index.folder == folder
        assert (folder / "meta.json").stat().st_mtime_ns == built
    target = unit(np.random.default_rng(9).standard_normal(32)).astype(np.float32)
    time.sleep(0.01)
    new = ex_rows([(500, "A", "the new one", "ok", 0), (501, "A", "no vector", "ok", 0)])
    parts.write_part(run, {schema.EXPLANATIONS: new, schema.EMBEDDINGS: emb_rows([(500, "A", target), (501, "A", None)])})
    with SemanticSearch.open(run) as s3:
        assert s3.index is not None and s3.index.folder != folder and not folder.exists()
        assert len(s3) == 501 and 501 not in s3.index.ids  # a null embedding is left out
        hit = s3.search(target, 1)[0]
        assert (hit.feature_id, hit.text, hit.score) == (500, "the new one", None)
        assert hit.similarity == pytest.approx(1.0, abs=1e-5)
    assert [p.name for p in root.iterdir()] == [s3.index.folder.name]


def test_ivf_recall_and_filters(tmp_path, monkeypatch):
    monkeypatch.setattr(vectors_mod, "SUBSET_EXACT", 1000)  # filtered searches go through the IVF lists too
    n, dim = 30_000, 64
    vectors = synthetic_vectors(n, dim, n_topics=3000, n_super=40, noise=1.0, seed=3)  # 10 per topic: top 50 spans lists
    rng = np.random.default_rng(0)
    density = 10 ** rng.uniform(-6, -1, n)
    score = rng.uniform(0, 1, n).astype(np.float32)
    ids = np.arange(n, dtype=np.int32)[::-1].copy()  # ids differ from row numbers
    index = VectorIndex.build(tmp_path / "ivf", ids, vectors, density, score, ivf_min=10_000, n_lists=128)
    assert index.is_ivf and index.meta["n_lists"] == 128 and index.offsets[-1] == n
    assert sorted(index.ids.tolist()) == list(range(n))
    exact = VectorIndex.build(tmp_path / "exact", ids, vectors, density, score, ivf_min=10**9)
    assert not exact.is_ivf
    queries = synthetic_queries(30, dim, n_topics=3000, n_super=40, seed=3, query_seed=1)
    lo, hi = np.quantile(density, [0.2, 0.6])
    dense = float(np.quantile(density, 0.9))

    def recall(filters, n_probe):
        keep = np.ones(n, bool)
        keep &= (density >= filters.get("min_density", 0)) & (density <= filters.get("max_density", 1))
        keep &= score >= filters.get("min_score", 0)
        found = total = 0
        for i, q in enumerate(queries):
            got = [h.feature_id for h in index.search(q, 50, n_probe=n_probe, **filters)]
            want = [h.feature_id for h in exact.search(q, 50, **filters)]
            if i < 5:
                assert [int(ids[r]) for r in brute(vectors, q, 50, keep)] == want  # the exact index is brute force
            assert len(got) == min(50, keep.sum()) and len(set(got)) == len(got)
            assert keep[n - 1 - np.array(got)].all()  # every hit passes the filters
            found += len(set(got) & set(want))
            total += len(want)
        return found / total

    assert recall({}, 1) < 0.8  # one list is not enough: the data does test the probing
    both = {"min_density": float(np.median(density)), "min_score": 0.5}  # two broad filters: the count is estimated
    rare = {"min_density": dense, "min_score": 0.8}  # 2% pass: probes many lists
    for filters in ({}, {"min_density": lo, "max_density": hi}, {"min_score": 0.5}, rare, both):
        assert recall(filters, 8) >= 0.9, filters
    # a narrow filter (few rows pass) is searched exactly over them
    narrow = {"min_density": float(np.quantile(density, 0.5)), "max_density": float(np.quantile(density, 0.52))}
    for q in queries[:5]:
        assert [h.feature_id for h in index.search(q, 50, **narrow)] == [h.feature_id for h in exact.search(q, 50, **narrow)]
    # reopened from disk: the same answers
    again = VectorIndex.load(tmp_path / "ivf")
    first = [h.feature_id for h in index.search(queries[0], 10, n_probe=8)]
    assert [h.feature_id for h in again.search(queries[0], 10, n_probe=8)] == first


def test_search_per_embedding_model(tmp_path):
    run, indexed, _, _ = search_run(tmp_path, n=300)
    other = unit(np.random.default_rng(4).standard_normal((300, 8))).astype(np.float32)
    # another explainer's explanations, embedded by another model (one embedding per explanation: storage's key)
    parts.write_part(run, {schema.EXPLANATIONS: ex_rows([(i, "C", f"c{i}", "ok", 0) for i in range(200)]),
                             schema.EMBEDDINGS: emb_rows([(i, "C", other[i]) for i in range(200)], model="other")})
    with SemanticSearch.open(run) as default, SemanticSearch.open(run, model="other") as by_other:
        assert default.model == "mini" and len(default) == 300 and default.index is not None
        assert by_other.model == "other" and len(by_other) == 200 and by_other.index is not None
        assert by_other.index.dim == 8 and default.index.dim == 32
        assert [(h.feature_id, h.explainer, h.text) for h in by_other.search(other[7], 1)] == [(7, "C", "c7")]
        assert {h.explainer for h in default.search(indexed[7], 20)} <= {"A", "B"}
        assert default.index.folder.exists() and by_other.index.folder.exists()  # one model's index keeps the other's
    with SemanticSearch.open(run, model="missing") as none:
        assert none.index is None and none.search(other[0]) == []
    # the same explanations embedded by a second model are kept beside the first model's, through consolidation
    with InterpStore.open(run) as st:
        before = st.embedding_models()
    parts.write_part(run, {schema.EMBEDDINGS: emb_rows([(i, "C", other[i]) for i in range(200)], model="other2")})
    parts.consolidate(run)
    with InterpStore.open(run) as st:
        assert st.embedding_models() == {**before, "other2": 200} and before["other"] == 200


def test_concurrent_writers_claim_distinct_parts_and_consolidate_spares_live_ones(tmp_path):
    """The app's live explain and a running ``saescope explain`` write parts at once: none is lost or refused, and
    ``consolidate`` removes only half-written folders whose writer is gone."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from engine.interp import parts, schema

    def one(i: int) -> str:
        row = {"feature_id": [i], "explainer": ["w"], "prompt_version": ["v"], "explanation": [f"text {i}"],
               "status": ["ok"], "reason": [""], "created_at": [0]}
        table = pa.table({f.name: row.get(f.name, [None]) for f in schema.EXPLANATIONS_SCHEMA})
        return parts.write_part(tmp_path, {schema.EXPLANATIONS: table.cast(schema.EXPLANATIONS_SCHEMA)}).name

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(one, range(64)))
    assert len(set(names)) == 64 and sorted(names) == [f"{i:08d}" for i in range(64)]
    folder = parts.parts_dir(tmp_path)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (folder / f".tmp-{alive.pid}-abc").mkdir()
        (folder / f".tmp-{dead.pid}-def").mkdir()
        counts = parts.consolidate(tmp_path)
        assert counts[schema.EXPLANATIONS] == 64
        assert (folder / f".tmp-{alive.pid}-abc").is_dir() and not (folder / f".tmp-{dead.pid}-def").exists()
        assert parts.read_all(tmp_path, schema.EXPLANATIONS)["feature_id"].to_pylist() == list(range(64))
    finally:
        alive.kill()
        alive.wait()


def _tables(path):
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {}
        for table, keys in (("explanations", "feature_id, explainer, prompt_version"),
                            ("scores", "feature_id, explainer, prompt_version, scorer"),
                            ("embedded", "feature_id, explainer, prompt_version, model")):
            out[table] = con.execute(f"SELECT * FROM {table} ORDER BY {keys}").fetchall()
        return out
    finally:
        con.close()


def test_new_parts_are_applied_incrementally_and_equal_a_full_build(run, tmp_path):
    """Random batches (new latents, rewritten explanations and scores, failed ones, embeddings) applied one open at
    a time give the same tables as building from all files at once, and ``changed_since`` names exactly the
    latents each batch touched."""
    rng = np.random.default_rng(3)
    with InterpStore.open(run) as st:
        assert st.refresh == "built"
        first = st.signature
    seen = [first]
    touched_after: list[set] = []
    for batch in range(6):
        fids = sorted({int(f) for f in rng.integers(0, 40, size=int(rng.integers(1, 6)))})
        who = ["A", "B", "C"]
        ex = [(f, str(rng.choice(who)), f"b{batch} f{f}", "ok" if rng.random() > 0.2 else "failed", 20 + batch)
              for f in fids]
        sc = [(f, w, str(rng.choice(["detection", "fuzzing"])), float(rng.random()), None) for f, w, *_ in ex]
        em = [(f, w, rng.normal(size=4)) for f, w, *_ in ex if rng.random() > 0.5]
        tables = {schema.EXPLANATIONS: ex_rows(ex), schema.SCORES: sc_rows(sc)}
        if em:
            tables[schema.EMBEDDINGS] = emb_rows(em)
        parts.write_part(run, tables)
        with InterpStore.open(run) as st:
            assert st.refresh == "applied"
            touched_after.append(set(fids))
            assert st.changed_since(st.signature).tolist() == []
            for i, old in enumerate(seen):  # every earlier state: the union of the batches since
                assert set(st.changed_since(old).tolist()) == set().union(*touched_after[i:])
            seen.append(st.signature)
        with InterpStore.open(run) as st:
            assert st.refresh == "current"
    fresh = index_mod.build_interp_db(run, tmp_path / "fresh.duckdb")
    assert _tables(run / INTERP_DB) == _tables(fresh)
    with InterpStore.open(run) as st:  # reads see the applied rows (ranks included)
        best = {f: (e.explainer, e.text) for f, e in st.best().items()}
    parts.consolidate(run)
    with InterpStore.open(run) as st:
        assert st.refresh == "built"
        assert {f: (e.explainer, e.text) for f, e in st.best().items()} == best
        assert st.changed_since(seen[0]) is None  # a full build since: unknown


def _contents(index):
    """id -> (score, source, density), and the vectors in id order."""
    order = np.argsort(index.ids)
    num = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
    meta = {int(index.ids[r]): (num(index.score[r]), tuple(index.sources[int(index.source[r])]), num(index.density[r]))
            for r in order}
    return meta, np.asarray(index.vectors)[order]


def test_search_index_updated_with_the_changed_latents_only(tmp_path):
    """New explanations change some latents' best embedded explanation: the next open updates the IVF index from
    the earlier one (lists kept, only those latents' rows replaced) and it holds exactly what a fresh build holds."""
    run, indexed, _, _ = search_run(tmp_path, n=3000)
    settings = {"ivf_min": 1000, "n_lists": 16}
    with SemanticSearch.open(run, **settings) as first:
        assert first.index is not None and first.index.is_ivf
        old_folder, old_centroids = first.index.folder, np.array(first.index.centroids)
    rng = np.random.default_rng(11)
    v5, v3000 = unit(rng.standard_normal(32)), unit(rng.standard_normal(32))
    parts.write_part(run, {
        schema.EXPLANATIONS: ex_rows([(5, "C", "c5", "ok", 50), (7, "C", "junk", "failed", 50), (3000, "A", "new", "ok", 50)]),
        schema.SCORES: sc_rows([(5, "C", "detection", 0.97, None), (9, "A", "detection", 0.01, None)]),
        schema.EMBEDDINGS: emb_rows([(5, "C", v5), (3000, "A", v3000)]),
    })
    with SemanticSearch.open(run, **settings) as updated:
        index = updated.index
        assert index is not None and index.meta["updated_from"] == old_folder.name and not old_folder.exists()
        assert index.meta["rows_read"] == 4 and index.meta["rows_replaced"] == 3  # latents 5, 7, 9 (+ the new 3000)
        assert np.array_equal(index.centroids, old_centroids)
        hit = updated.search(v5, 1)[0]
        assert (hit.feature_id, hit.explainer, hit.text, hit.score) == (5, "C", "c5", 0.97)
        got, matrix = _contents(index)
        # the same data built from scratch (another seed: another folder)
        fresh = SemanticSearch.open(run, ivf_min=1000, n_lists=16, seed=1)
        assert fresh.index is not None and "updated_from" not in fresh.index.meta
        want_meta, want_matrix = _contents(fresh.index)
        assert got == want_meta and len(got) == 3001
        np.testing.assert_allclose(matrix, want_matrix, atol=1e-6)
        fresh.close()
        ids = np.array(sorted(got))
        for q in synthetic_queries(5, 32, n_topics=64, n_super=8, seed=0, query_seed=2):  # exact search: brute force
            want = ids[np.lexsort((ids, -(matrix @ unit(q))))[:10]]
            assert [h.feature_id for h in index.search(q, 10, exact=True)] == want.tolist()


def test_report_pools_failures_and_averages_per_quantile_by_hand(tmp_path):
    from engine.interp.report import report

    run = tmp_path / "run"
    run.mkdir()
    d1 = {"auroc": 0.75, "failed": 1, "mass": [0.9, 0.1, 0.8, 0.7], "by_quantile": {"0": 1.0, "3": 0.0, "-1": 0.5}}
    d2 = {"auroc": 0.25, "failed": 0, "mass": [0.9, 0.9], "by_quantile": {"0": 0.5, "-1": 1.0}}
    d3 = {"failed": 2, "mass": [None, None], "by_quantile": {}}  # both failed: no score
    parts.write_part(run, {schema.SCORES: sc_rows([(1, "A", "detection", 0.6, json.dumps(d1)),
                                                   (2, "A", "detection", 0.8, json.dumps(d2)),
                                                   (3, "A", "detection", None, json.dumps(d3)),
                                                   (1, "A", "embedding", 0.7, json.dumps({"by_quantile": {"0": 0.9}}))])})
    got = report(run)["A"]
    assert got["detection"] == {"n": 2, "score": pytest.approx(0.7), "auroc": pytest.approx(0.5),
                                "failure_rate": pytest.approx(3 / 8),
                                "by_quantile": {0: pytest.approx(0.75), 3: 0.0, -1: pytest.approx(0.75)}}
    assert got["embedding"] == {"n": 1, "score": 0.7, "auroc": None, "failure_rate": None, "by_quantile": {0: 0.9}}
    assert report(run, [2])["A"]["detection"]["score"] == pytest.approx(0.8)
