"""Search-by-meaning benchmark: ranking latency at a million latents, IVF recall against exact search, index build
time, and the time to embed a query with the real embedding model (docs/explanations.md).

The vectors are synthetic but shaped like sentence embeddings of explanations: ``n_super`` broad themes, each
with topics around it (cosine about 0.8 to their theme), each vector a topic plus noise, normalised (cosine
about 0.55 within a topic). Nearest neighbours are then a few topics deep, as for real explanations ("month
names" sits near "days of the week" and far from "Python keywords"). Vectors, densities (log-uniform,
independent of topic) and the index are cached under ``<data>/cache/bench-search/``; a rerun reuses them and
reports the recorded build time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from ..interp.vectors import IVF_MIN, N_LISTS, N_PROBE, VectorIndex, unit

QUERY_TEXTS = ["month names in dates", "third-person pronouns", "closing parenthesis in Python code",
               "words about money and prices", "the end of a sentence", "numbers in scientific tables",
               "French words", "negation such as not or never"]


def _centres(dim: int, n_topics: int, n_super: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_super`` unit themes and ``n_topics`` unit topic centres, each near one theme (cosine about 0.8)."""
    rng = np.random.default_rng([seed, 1])
    supers = unit(rng.standard_normal((n_super, dim), dtype=np.float32))
    parent = rng.integers(0, n_super, n_topics)
    return supers, unit(supers[parent] + 0.8 * unit(rng.standard_normal((n_topics, dim), dtype=np.float32)))


N_TOPICS = 16_384
"""About 60 vectors per topic at a million: a query's top 50 spans its topic and the nearest sibling topics."""


def synthetic_vectors(n: int, dim: int, *, n_topics: int = N_TOPICS, n_super: int = 256, noise: float = 0.9,
                      seed: int = 0, chunk: int = 65_536) -> np.ndarray:
    """``[n, dim]`` unit float32 vectors: a random topic centre plus noise of norm ``noise`` each."""
    _, centres = _centres(dim, n_topics, n_super, seed)
    rng = np.random.default_rng([seed, 2])
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        topic = rng.integers(0, n_topics, m)
        out[i : i + m] = unit(centres[topic] + noise * unit(rng.standard_normal((m, dim), dtype=np.float32)))
    return out


def synthetic_queries(n: int, dim: int, *, n_topics: int = N_TOPICS, n_super: int = 256, noise: float = 1.1,
                      seed: int = 0, query_seed: int = 0, broad: bool = False) -> np.ndarray:
    """Queries near the topics of ``synthetic_vectors(..., seed=seed)``, a little noisier than the vectors (a query
    is not an explanation); ``broad``: near a theme instead (its top 50 spans many topics), with noise 0.5."""
    supers, centres = _centres(dim, n_topics, n_super, seed)
    rng = np.random.default_rng([seed, 3, query_seed])
    if broad:
        return unit(supers[rng.integers(0, n_super, n)] + 0.5 * unit(rng.standard_normal((n, dim), dtype=np.float32)))
    topic = rng.integers(0, n_topics, n)
    return unit(centres[topic] + noise * unit(rng.standard_normal((n, dim), dtype=np.float32)))


def _cache_root() -> Path:
    from ..assets import data_dir

    return data_dir() / "cache" / "bench-search"


def _dataset(root: Path, n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(vectors memory-mapped, densities, scores, whether it was cached)."""
    folder = root / f"data-{n}-{dim}-{seed}"
    if (folder / "done").is_file():
        return (np.load(folder / "vectors.npy", mmap_mode="r"), np.load(folder / "density.npy"),
                np.load(folder / "score.npy"), True)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = synthetic_vectors(n, dim, seed=seed)
    rng = np.random.default_rng([seed, 4])
    density = 10 ** rng.uniform(-6, -1, n)
    score = rng.uniform(0.4, 1.0, n).astype(np.float32)
    np.save(folder / "vectors.npy", vectors)
    np.save(folder / "density.npy", density)
    np.save(folder / "score.npy", score)
    (folder / "done").write_text("")
    return np.load(folder / "vectors.npy", mmap_mode="r"), density, score, False


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "max_ms": round(float(ms.max()), 3)}


def _recall(index: VectorIndex, queries: np.ndarray, k: int, filters: dict) -> float:
    hits = total = 0
    for q in queries:
        got, _ = index.search_rows(q, k, **filters)
        want, _ = index.search_rows(q, k, exact=True, **filters)
        hits += len(set(got.tolist()) & set(want.tolist()))
        total += len(want)
    return hits / max(total, 1)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def query_embedding(n: int = 40) -> dict | None:
    """p50/p95 of ``Embedder.encode([text])`` for one short query on this machine's CPU (None: no model folder)."""
    from ..interp.embed import Embedder, embedding_model_dir

    folder = embedding_model_dir()
    if not (folder / "config.json").is_file():
        return None
    started = time.perf_counter()
    embedder = Embedder(folder)
    load = time.perf_counter() - started
    embedder.encode(QUERY_TEXTS[:2])  # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter()
        embedder.encode([QUERY_TEXTS[i % len(QUERY_TEXTS)]])
        times.append(time.perf_counter() - t)
    return {"model": embedder.name, "load_s": round(load, 2), **_percentiles(times)}


def search_bench(n: int = 1_000_000, dim: int = 384, *, k: int = 50, n_queries: int = 300, n_recall: int = 100,
                 ivf_min: int = IVF_MIN, n_lists: int = N_LISTS, n_probe: int = N_PROBE, seed: int = 0,
                 embed: bool = True, cache: str | Path | None = None) -> dict:
    """Latency (p50/p95 over ``n_queries`` random queries) of the top-``k`` ranking without and with density
    filters, recall@k of the index against exact search, the index build time and the query embedding time."""
    root = Path(cache) if cache is not None else _cache_root()
    t = time.perf_counter()
    vectors, density, score, data_cached = _dataset(root, n, dim, seed)
    data_seconds = time.perf_counter() - t
    folder = root / f"index-{n}-{dim}-{seed}-{ivf_min}-{n_lists}"
    index = None
    if (folder / "meta.json").is_file():
        try:
            index = VectorIndex.load(folder)
        except ValueError:  # written by another index version
            shutil.rmtree(folder)
    built_now = index is None
    if index is None:
        index = VectorIndex.build(folder, np.arange(n, dtype=np.int32), vectors, density, score, ivf_min=ivf_min,
                                  n_lists=n_lists, seed=seed)
    queries = synthetic_queries(n_queries, dim, seed=seed, query_seed=1)
    lo, hi = np.quantile(density, [0.45, 0.55])
    filters = {
        "none": {},
        "density_10pct": {"min_density": float(lo), "max_density": float(hi)},
        "density_1pct": {"min_density": float(np.quantile(density, 0.50)), "max_density": float(np.quantile(density, 0.51))},
        "density_50pct_score": {"min_density": float(np.quantile(density, 0.5)), "min_score": 0.7},
    }
    index.warm()  # steady state: the file in the page cache and mapped (SemanticSearch.open does the same)
    for q in queries[:10]:
        index.search_rows(q, k, n_probe=n_probe)
    modes = {}
    for name, f in filters.items():
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search_rows(q, k, n_probe=n_probe, **f)
            times.append(time.perf_counter() - t)
        keep = index._passes(slice(None), f.get("min_density"), f.get("max_density"), f.get("min_score"))
        kept = n if keep is None else int(keep.sum())
        recall = _recall(index, queries[:n_recall], k, {**f, "n_probe": n_probe}) if index.is_ivf else 1.0
        modes[name] = {**_percentiles(times), "kept": kept, f"recall@{k}": round(recall, 4)}
    broad = synthetic_queries(n_recall, dim, seed=seed, query_seed=2, broad=True)
    broad_recall = _recall(index, broad, k, {"n_probe": n_probe}) if index.is_ivf else 1.0
    far = synthetic_queries(n_recall, dim, seed=seed + 7)  # centres of another draw: near no topic of the data
    far_recall = _recall(index, far, k, {"n_probe": n_probe}) if index.is_ivf else 1.0
    exact_times = []
    for q in queries[:20]:
        t = time.perf_counter()
        index.search_rows(q, k, exact=True)
        exact_times.append(time.perf_counter() - t)
    return {
        "n": n, "dim": dim, "k": k, "n_queries": n_queries, "index": index.meta["kind"],
        "n_lists": index.meta.get("n_lists"), "n_probe": n_probe, "largest_list": index.meta.get("largest_list"),
        "build_seconds": index.meta["build_seconds"], "index_built_now": built_now, "data_cached": data_cached,
        "data_seconds": round(data_seconds, 2), "modes": modes,
        "broad_recall": round(broad_recall, 4), "far_recall": round(far_recall, 4), "exact": _percentiles(exact_times),
        "query_embedding": query_embedding() if embed else None,
        "cpu": _cpu(), "cpu_count": os.cpu_count(), "folder": str(folder),
    }


def format(result: dict) -> list[str]:
    """Report lines for a ``search_bench`` result."""
    r = result
    ivf = f", {r['n_lists']} lists, probe {r['n_probe']}, largest list {r['largest_list']:,}" if r["index"] == "ivf" else ""
    lines = [f"search by meaning: {r['n']:,} latents x {r['dim']} ({r['index']}{ivf}) on {r['cpu']} ({r['cpu_count']} cores)",
             f"  index build {r['build_seconds']:.1f} s" + ("" if r["index_built_now"] else " (recorded when built; reused)")]
    for name, m in r["modes"].items():
        recall = next(v for key, v in m.items() if key.startswith("recall@"))
        lines.append(f"  top-{r['k']} {name:<20} p50 {m['p50_ms']:6.2f} ms  p95 {m['p95_ms']:6.2f} ms  "
                     f"recall@{r['k']} {recall:.3f}  ({m['kept']:,} latents pass)")
    lines.append(f"  recall@{r['k']} of broad queries (near a theme): {r['broad_recall']:.3f}; of queries near nothing "
                 f"(their neighbours are noise): {r['far_recall']:.3f}")
    lines.append(f"  exact (brute force)         p50 {r['exact']['p50_ms']:6.2f} ms  p95 {r['exact']['p95_ms']:6.2f} ms")
    qe = r.get("query_embedding")
    if qe:
        lines.append(f"  query embedding ({qe['model']}) p50 {qe['p50_ms']:.1f} ms  p95 {qe['p95_ms']:.1f} ms"
                     f"  (model load {qe['load_s']:.1f} s)")
    else:
        lines.append("  query embedding: no embedding model folder (not measured)")
    return lines


def _explained_run(run: Path, n: int, dim: int, seed: int) -> None:
    """A run folder holding only consolidated explanation files: ``n`` latents, each with one explanation, a
    detection score and an embedding (``synthetic_vectors``), as a finished ``saescope explain`` leaves them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..interp import schema

    rng = np.random.default_rng([seed, 7])
    ids = np.arange(n, dtype=np.int32)
    now = np.datetime64("2026-01-01T00:00:00", "us")
    common = {"feature_id": ids, "explainer": ["A"] * n, "prompt_version": ["v1"] * n}
    tables = {
        schema.EXPLANATIONS: pa.table({**common, "explanation": [f"explanation of latent {i}" for i in range(n)],
                                       "created_at": np.full(n, now), "status": ["ok"] * n, "reason": [""] * n}),
        schema.SCORES: pa.table({**common, "scorer": ["detection"] * n, "score": rng.uniform(0.4, 0.9, n),
                                 "n_examples": np.full(n, 20, np.int32), "details": ["{}"] * n}),
        schema.EMBEDDINGS: pa.table({**common, "model": ["bench"] * n, "embedding": pa.FixedSizeListArray.from_arrays(
            synthetic_vectors(n, dim, seed=seed).reshape(-1), dim).cast(pa.list_(pa.float32()))}),
    }
    for name, table in tables.items():
        pq.write_table(table.select(schema.FILES[name].names).cast(schema.FILES[name]), run / name,
                       compression="zstd", row_group_size=65_536)


def refresh_bench(n: int = 262_144, dim: int = 384, batch: int = 16, *, root: Path | None = None, seed: int = 0,
                  ivf_min: int = IVF_MIN, n_lists: int = N_LISTS) -> dict:
    """What a new batch of explanations costs the app: ``n`` explained latents (consolidated), then one part of
    ``batch`` new explanations (a live explain, or one batch of a running ``saescope explain``). Times the next
    open of the explanation database and of the search index, applied incrementally, against building both from
    scratch for the same files, side by side in this process; checks both give the same best explanations."""
    from ..interp import index as interp_index
    from ..interp import parts, schema
    from ..interp.search import SemanticSearch
    from ..interp.store import InterpStore

    root = Path(root) if root else _cache_root()
    run = root / f"refresh-{n}-{dim}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    try:
        _explained_run(run, n, dim, seed)
        settings = {"ivf_min": ivf_min, "n_lists": n_lists, "warm": False}
        with InterpStore.open(run) as store, SemanticSearch.open(store, **settings):
            pass
        rng = np.random.default_rng([seed, 8])
        fids = np.sort(rng.choice(n + batch, size=batch, replace=False)).astype(np.int32)  # rewrites and new latents
        import pyarrow as pa

        common = {"feature_id": fids, "explainer": ["B"] * batch, "prompt_version": ["v1"] * batch}
        new = {
            schema.EXPLANATIONS: pa.table({**common, "explanation": [f"new {i}" for i in fids],
                                           "created_at": np.full(batch, np.datetime64("2026-02-01", "us")),
                                           "status": ["ok"] * batch, "reason": [""] * batch}),
            schema.SCORES: pa.table({**common, "scorer": ["detection"] * batch, "score": np.full(batch, 0.95),
                                     "n_examples": np.full(batch, 20, np.int32), "details": ["{}"] * batch}),
            schema.EMBEDDINGS: pa.table({**common, "model": ["bench"] * batch, "embedding": [
                unit(v).tolist() for v in rng.standard_normal((batch, dim), dtype=np.float32)]}),
        }
        parts.write_part(run, {name: t.select(schema.FILES[name].names) for name, t in new.items()})
        t0 = time.perf_counter()
        store = InterpStore.open(run)
        t1 = time.perf_counter()
        search = SemanticSearch.open(store, **settings)
        t2 = time.perf_counter()
        assert store.refresh == "applied" and search.index is not None and "updated_from" in search.index.meta
        applied_best = store.best()
        t3 = time.perf_counter()
        interp_index.build_interp_db(run, run / "full.duckdb")
        t4 = time.perf_counter()
        full = SemanticSearch.open(store, **{**settings, "seed": seed + 1})  # other settings: built from scratch
        t5 = time.perf_counter()
        assert full.index is not None and "updated_from" not in full.index.meta
        with InterpStore.open(run) as again:
            same = {f: e.text for f, e in applied_best.items()} == {f: e.text for f, e in again.best().items()}
        same_index = bool(np.array_equal(np.sort(search.index.ids), np.sort(full.index.ids)))
        store.close()
        db_mb = (run / "interp.duckdb").stat().st_size / 2**20
        return {
            "n": n, "dim": dim, "batch": batch, "index": "ivf" if search.index.is_ivf else "exact",
            "interp_db": {"applied_s": round(t1 - t0, 3), "full_s": round(t4 - t3, 3),
                          "speedup": round((t4 - t3) / max(t1 - t0, 1e-9), 1), "file_mb": round(db_mb, 1)},
            "search_index": {"applied_s": round(t2 - t1, 3), "full_s": round(t5 - t4, 3),
                             "speedup": round((t5 - t4) / max(t2 - t1, 1e-9), 1)},
            "same_best": same, "same_index_ids": same_index, "cpu": _cpu(), "cpu_count": os.cpu_count(),
        }
    finally:
        shutil.rmtree(run, ignore_errors=True)


def format_refresh(r: dict) -> list[str]:
    """Report lines for a ``refresh_bench`` result."""
    db, ix = r["interp_db"], r["search_index"]
    return [f"a batch of {r['batch']} new explanations over {r['n']:,} explained latents ({r['index']} index), on "
            f"{r['cpu']} ({r['cpu_count']} cores):",
            f"  interp.duckdb  applied {db['applied_s']:.2f} s, rebuilt {db['full_s']:.2f} s ({db['speedup']}x; "
            f"{db['file_mb']} MB copied)",
            f"  search index   applied {ix['applied_s']:.2f} s, rebuilt {ix['full_s']:.2f} s ({ix['speedup']}x)",
            f"  same best explanations and indexed latents both ways: {r['same_best'] and r['same_index_ids']}"]


if __name__ == "__main__":
    print(json.dumps(search_bench(), indent=2))
