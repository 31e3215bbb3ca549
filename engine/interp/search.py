"""Search latents by meaning: rank the embeddings of their best explanations by cosine to a query vector.

``SemanticSearch.open(run_dir)`` indexes, per latent, the best-ranked usable non-baseline explanation that has an
embedding (``InterpStore.embedded_best``) with its mean score and the latent's density (``features.parquet``).
The index lives in ``<run>/.interp/search/<key>/`` as ``.npy`` files opened memory-mapped (in a temp folder when
the run directory is not writable); ``key`` hashes the source files' signature, so new explanations, scores or
embeddings make a new index and the old one is removed.

``VectorIndex`` is the index itself:

* below ``IVF_MIN`` vectors it is exact: one float32 matrix-vector product over all of them;
* from ``IVF_MIN`` on it is an IVF index: spherical k-means (``N_LISTS`` centroids trained on a sample) splits
  the vectors into lists stored contiguously, a query scans the ``n_probe`` lists whose centroids are nearest and
  re-ranks their vectors exactly. An exact float32 product over 1M x 384 streams 1.5 GB (about 115 ms on one
  thread of a 2-core Xeon); 32 of 1024 lists stream about 3% of it (about 4 ms).

Filters (density range, minimum score) apply before the top ``k`` is taken. Row permutations sorted by density
and by score count the rows a filter keeps in microseconds: a small filtered set is searched exactly (its rows
gathered); a large one with IVF probes more lists (``n_probe / sqrt(fraction kept)``, then more until ``k``
candidates pass).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..run import schema
from . import storage
from .store import InterpStore, fallback_dir, source_files

INDEX_VERSION = 2
IVF_MIN = 200_000
"""From this many vectors on, an IVF index; below it, exact search."""
N_LISTS = 1024
N_PROBE = 32
TRAIN_PER_LIST = 32
"""k-means training sample: this many vectors per list (32,768 for 1,024 lists)."""
KMEANS_ITERS = 8
SUBSET_EXACT = 32_768
"""A filter keeping at most this many rows is searched exactly over them (gathered), IVF or not."""
SEARCH_DIR = "search"
_CHUNK = 16_384


@dataclass(frozen=True)
class Hit:
    feature_id: int
    similarity: float
    """Cosine between the query and the explanation's embedding."""
    density: float | None
    score: float | None
    """Mean score of the explanation (None: unscored)."""
    explainer: str
    prompt_version: str
    text: str | None = None
    """The explanation (filled by ``SemanticSearch``; None from a bare ``VectorIndex``)."""


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def _dot(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``matrix @ q`` on this thread: a memory-bound product gains nothing from BLAS threads, and on busy cores a
    threaded BLAS call waits for a descheduled helper thread (p95 of 32 list products: 72-98 ms threaded, 8-12 ms
    here, 2 shared cores)."""
    return np.einsum("ij,j->i", matrix, q)


def _nearest(x: np.ndarray, centroids: np.ndarray, normalise: bool = False) -> np.ndarray:
    """Index of the centroid with the largest dot product, for each row (chunked)."""
    out = np.empty(len(x), np.int32)
    for i in range(0, len(x), _CHUNK):
        chunk = unit(x[i : i + _CHUNK]) if normalise else np.asarray(x[i : i + _CHUNK], np.float32)
        out[i : i + _CHUNK] = np.argmax(chunk @ centroids.T, axis=1)
    return out


def spherical_kmeans(x: np.ndarray, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> np.ndarray:
    """``k`` unit centroids maximising the summed cosine of each row of ``x`` to its nearest one."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centroids = unit(x[np.sort(rng.choice(len(x), size=k, replace=False))])
    for _ in range(iters):
        assign = _nearest(x, centroids)
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        filled = counts > 0
        sums = np.zeros_like(centroids)
        sums[filled] = np.add.reduceat(x[order], starts[filled], axis=0)
        empty = np.flatnonzero(~filled)
        if len(empty):  # reseed empty lists on random rows
            sums[empty] = x[rng.choice(len(x), size=len(empty), replace=False)]
        centroids = unit(sums)
    return centroids


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / name, np.ascontiguousarray(array), allow_pickle=False)


class VectorIndex:
    """Unit vectors with their latent ids, densities and scores, searched exactly or through IVF lists.

    Build with ``VectorIndex.build(folder, ...)`` and open with ``VectorIndex.load(folder)``; the arrays are
    memory-mapped, so an open index costs little memory and threads may share it (search only reads).
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder = Path(folder)
        self.meta = meta
        self.n, self.dim = int(meta["n"]), int(meta["dim"])
        self.is_ivf = meta["kind"] == "ivf"
        load = lambda name: np.load(self.folder / name, mmap_mode="r", allow_pickle=False)  # noqa: E731
        self.vectors = np.asarray(load("vectors.npy"))  # a plain view of the map: slicing a memmap costs more
        self.ids = np.asarray(load("ids.npy"))
        self.density = np.asarray(load("density.npy"))
        self.score = np.asarray(load("score.npy"))
        self.source = np.asarray(load("source.npy"))
        self.sources = [tuple(s) for s in meta["sources"]]
        self.by_density, self.density_sorted = load("by_density.npy"), load("density_sorted.npy")
        self.by_score, self.score_sorted = load("by_score.npy"), load("score_sorted.npy")
        self.n_density = int(np.isfinite(self.density).sum())
        self.n_scored = int(np.isfinite(self.score).sum())
        if self.is_ivf:
            self.centroids = np.asarray(load("centroids.npy"))
            self.offsets = np.asarray(load("offsets.npy"))

    @classmethod
    def build(cls, folder: str | Path, ids: np.ndarray, vectors: np.ndarray, density: np.ndarray | None = None,
              score: np.ndarray | None = None, source: np.ndarray | None = None, sources: list | None = None, *,
              ivf_min: int = IVF_MIN, n_lists: int = N_LISTS, seed: int = 0, extra: dict | None = None) -> VectorIndex:
        """Write an index of ``vectors`` (``[n, dim]``, normalised here) into ``folder`` (created aside and renamed
        into place) and open it. ``density``/``score`` (NaN: unknown) feed the filters; ``source`` indexes
        ``sources`` (explainer, prompt version) per row."""
        started = time.perf_counter()
        folder = Path(folder)
        n = len(ids)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != n:
            raise ValueError(f"vectors must be [n, dim] with n = len(ids) = {n}, got {vectors.shape}")
        density = np.full(n, np.nan) if density is None else np.asarray(density, np.float64)
        score = np.full(n, np.nan) if score is None else np.asarray(score, np.float64)
        source = np.zeros(n, np.int32) if source is None else np.asarray(source, np.int32)
        sources = sources if sources is not None else [["", ""]]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            kind = "ivf" if n >= max(ivf_min, 2) and n_lists > 1 else "exact"
            meta = {"version": INDEX_VERSION, "n": n, "dim": int(vectors.shape[1]) if n else 0, "kind": kind,
                    "sources": [list(s) for s in sources], **(extra or {})}
            if kind == "ivf":
                rng = np.random.default_rng(seed)
                sample = np.sort(rng.choice(n, size=min(n, n_lists * TRAIN_PER_LIST), replace=False))
                centroids = spherical_kmeans(unit(vectors[sample]), n_lists, seed=seed)
                assign = _nearest(vectors, centroids, normalise=True)
                order = np.argsort(assign, kind="stable")
                counts = np.bincount(assign, minlength=len(centroids))
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                _save(tmp, "centroids.npy", centroids)
                _save(tmp, "offsets.npy", offsets)
                meta["n_lists"] = len(centroids)
                meta["largest_list"] = int(counts.max())
            else:
                order = np.arange(n)
            out = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, meta["dim"]))
            for i in range(0, n, _CHUNK):
                out[i : i + _CHUNK] = unit(vectors[order[i : i + _CHUNK]])
            out.flush()
            del out
            ids, density, score, source = ids[order], density[order], score[order], source[order]
            _save(tmp, "ids.npy", np.asarray(ids, np.int32))
            _save(tmp, "density.npy", density)
            _save(tmp, "score.npy", score)
            _save(tmp, "source.npy", source)
            by_density = np.argsort(density, kind="stable").astype(np.int32)  # NaN last
            by_score = np.argsort(score, kind="stable").astype(np.int32)
            _save(tmp, "by_density.npy", by_density)
            _save(tmp, "density_sorted.npy", density[by_density])
            _save(tmp, "by_score.npy", by_score)
            _save(tmp, "score_sorted.npy", score[by_score])
            meta["build_seconds"] = round(time.perf_counter() - started, 3)
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same index first: keep theirs
                if not (folder / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.load(folder)

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{folder}: search index version {meta.get('version')}, expected {INDEX_VERSION}")
        return cls(Path(folder), meta)

    def warm(self) -> None:
        """Read every vector once, so the file is in the page cache and mapped into this process (the first
        queries otherwise pay for page faults: a few ms each at a million latents)."""
        for i in range(0, self.n, 1 << 16):
            self.vectors[i : i + (1 << 16)].sum()

    # --- filters ----------------------------------------------------------------------------------------------
    def _slices(self, min_density, max_density, min_score) -> list[np.ndarray]:
        """Per active filter, the rows it keeps (a slice of a sorted permutation)."""
        out = []
        if min_density is not None or max_density is not None:
            lo = 0 if min_density is None else int(np.searchsorted(self.density_sorted[: self.n_density], min_density, "left"))
            hi = self.n_density if max_density is None else int(
                np.searchsorted(self.density_sorted[: self.n_density], max_density, "right"))
            out.append(self.by_density[lo : max(lo, hi)])
        if min_score is not None:
            lo = int(np.searchsorted(self.score_sorted[: self.n_scored], float(min_score), "left"))
            out.append(self.by_score[lo : self.n_scored])
        return out

    def _passes(self, rows: slice | np.ndarray, min_density, max_density, min_score) -> np.ndarray | None:
        keep = None
        if min_density is not None or max_density is not None:
            d = self.density[rows]
            keep = np.isfinite(d)
            if min_density is not None:
                keep &= d >= min_density
            if max_density is not None:
                keep &= d <= max_density
        if min_score is not None:
            s = self.score[rows] >= float(min_score)
            keep = s if keep is None else keep & s
        return keep

    def _small(self, kept: int) -> bool:
        """Whether ``kept`` filtered rows are best searched exactly over just them (gathered)."""
        return kept <= SUBSET_EXACT or (not self.is_ivf and kept <= self.n // 4)

    # --- search -------------------------------------------------------------------------------------------------
    def search_rows(self, query: np.ndarray, k: int = 50, *, min_density: float | None = None,
                    max_density: float | None = None, min_score: float | None = None, n_probe: int | None = None,
                    exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosines) of the best ``k`` rows passing the filters, best first (ties: lower row)."""
        q = unit(np.asarray(query, np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dimensions, the index {self.dim}")
        k = int(k)
        if k <= 0 or self.n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        slices = self._slices(min_density, max_density, min_score)
        filtered = bool(slices)
        rows = None
        kept = self.n
        if filtered:
            rows = min(slices, key=len)  # the rows the most selective filter keeps
            kept = len(rows)
            if len(slices) > 1:  # the other filter, checked on those rows (the count sets how far IVF probes)
                if len(rows) > 4 * SUBSET_EXACT:  # many: estimate the count from an even sample
                    sample = self._passes(rows[:: len(rows) // 4096], min_density, max_density, min_score)
                    assert sample is not None
                    kept = math.ceil(len(rows) * float(sample.mean()))
                if len(rows) <= 4 * SUBSET_EXACT or self._small(kept):
                    keep = self._passes(rows, min_density, max_density, min_score)
                    assert keep is not None
                    rows = rows[keep]
                    kept = len(rows)
                else:
                    rows = None  # IVF or a full scan checks the filters as it goes
        if kept == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if rows is not None and self._small(kept):
            rows = np.sort(np.asarray(rows, np.int64))
            sims = np.concatenate([_dot(self.vectors[rows[i : i + 4096]], q) for i in range(0, len(rows), 4096)])
            return _top(rows, sims, k)
        if not self.is_ivf or exact:
            sims = _dot(self.vectors, q)
            if filtered:
                keep = self._passes(slice(None), min_density, max_density, min_score)
                assert keep is not None
                sims = np.where(keep, sims, -np.inf)
            return _top(np.arange(self.n), sims, k)
        fraction = kept / self.n
        n_probe = N_PROBE if n_probe is None else max(1, int(n_probe))
        if filtered:
            n_probe = math.ceil(n_probe / math.sqrt(fraction))
        return self._ivf(q, k, n_probe, (min_density, max_density, min_score) if filtered else None)

    def _ivf(self, q: np.ndarray, k: int, n_probe: int, filters: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-_dot(self.centroids, q), kind="stable")
        offsets = self.offsets
        rows_out, sims_out = [], []
        passing = 0
        probed = 0
        while probed < len(order) and (probed < n_probe or passing < k):
            step = order[probed : n_probe if probed == 0 else probed + 8]  # n_probe lists, then 8 at a time
            probed += len(step)
            for lst in step:
                s, e = int(offsets[lst]), int(offsets[lst + 1])
                if e == s:
                    continue
                sims = _dot(self.vectors[s:e], q)
                rows = np.arange(s, e)
                if filters is not None:
                    keep = self._passes(slice(s, e), *filters)
                    assert keep is not None
                    rows, sims = rows[keep], sims[keep]
                rows_out.append(rows)
                sims_out.append(sims)
                passing += len(rows)
        if not rows_out:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return _top(np.concatenate(rows_out), np.concatenate(sims_out), k)

    def search(self, query: np.ndarray, k: int = 50, *, min_density: float | None = None, max_density: float | None = None,
               min_score: float | None = None, n_probe: int | None = None, exact: bool = False) -> list[Hit]:
        """The ``k`` latents whose vectors are nearest ``query`` by cosine among those passing the filters."""
        rows, sims = self.search_rows(query, k, min_density=min_density, max_density=max_density, min_score=min_score,
                                      n_probe=n_probe, exact=exact)
        return [self._hit(int(r), float(s)) for r, s in zip(rows, sims, strict=True)]

    def _hit(self, row: int, sim: float) -> Hit:
        d, s = float(self.density[row]), float(self.score[row])
        who, version = self.sources[int(self.source[row])]
        return Hit(int(self.ids[row]), sim, d if math.isfinite(d) else None, s if math.isfinite(s) else None, who, version)


def _top(rows: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest finite ``sims`` with their rows, sorted descending (ties: lower row first)."""
    sims = np.asarray(sims, np.float32)
    if len(sims) > k:
        part = np.argpartition(-sims, k - 1)[:k]
        rows, sims = rows[part], sims[part]
    order = np.lexsort((rows, -sims))
    rows, sims = rows[order], sims[order]
    finite = np.isfinite(sims)
    return np.asarray(rows[finite], np.int64), sims[finite]


# --- a run's index --------------------------------------------------------------------------------------------------
def _file_key(path: Path) -> list:
    if not path.is_file():
        return [path.name, None]
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _embedding_rows(files: list[Path], ords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``ords`` (row numbers counted through ``files`` in order) of the embedding column as one float32 matrix,
    streamed batch by batch (memory: the matrix and one batch), and which rows had a vector of the common length
    (a null or odd-length one, from a foreign writer, is left out)."""
    order = np.argsort(ords, kind="stable")
    wanted = ords[order]
    out: np.ndarray | None = None
    ok = np.zeros(len(ords), bool)
    base = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=["embedding"]):
            n = batch.num_rows
            lo, hi = np.searchsorted(wanted, [base, base + n])
            if hi > lo:
                column = batch.column(0)
                local = wanted[lo:hi] - base
                lengths = np.asarray(column.value_lengths().fill_null(0))
                if out is None:
                    out = np.zeros((len(ords), int(np.bincount(lengths[local]).argmax())), np.float32)
                dim = out.shape[1]
                offsets = np.asarray(column.offsets)
                values = np.asarray(column.values.to_numpy(zero_copy_only=False), np.float32)
                good = lengths[local] == dim
                dest = order[lo:hi][good]
                starts = offsets[local[good]]
                if dim and (lengths == dim).all() and np.array_equal(offsets, offsets[0] + dim * np.arange(n + 1)):
                    out[dest] = values[offsets[0] :].reshape(n, dim)[local[good]]
                else:
                    for d, start in zip(dest, starts, strict=True):
                        out[d] = values[start : start + dim]
                ok[dest] = dim > 0
            base += n
    return (out if out is not None else np.zeros((len(ords), 0), np.float32)), ok


def _run_vectors(run_dir: Path, store: InterpStore, model: str) -> dict:
    """The embedding of each latent's best embedded explanation, with its score, density and source."""
    chosen = store.embedded_best(model)
    files = source_files(run_dir, storage.EMBEDDINGS)
    key_columns = ["feature_id", "explainer", "prompt_version", "model"]
    sub = pa.schema([storage.EMBEDDINGS_SCHEMA.field(c) for c in key_columns])
    keys = pa.concat_tables([pq.read_table(f, columns=key_columns).cast(sub) for f in files] or [sub.empty_table()])
    keys = keys.append_column("_ord", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
    con = duckdb.connect()
    try:
        con.register("emb", keys)
        con.register("chosen", pa.table({"feature_id": pa.array(chosen["feature_id"], pa.int32()),
                                         "explainer": pa.array(chosen["explainer"].tolist(), pa.string()),
                                         "prompt_version": pa.array(chosen["prompt_version"].tolist(), pa.string()),
                                         "i": pa.array(np.arange(len(chosen["feature_id"]), dtype=np.int64))}))
        picked = con.execute(
            "SELECT c.i, e._ord FROM chosen c JOIN emb e USING (feature_id, explainer, prompt_version) WHERE e.model = $model "
            "QUALIFY row_number() OVER (PARTITION BY c.i ORDER BY e._ord DESC) = 1 ORDER BY c.i", {"model": model}).fetchnumpy()
    finally:
        con.close()
    vectors, ok = _embedding_rows(files, np.asarray(picked["_ord"], np.int64))
    i = np.asarray(picked["i"], np.int64)[ok]
    vectors = vectors[ok] if not ok.all() else vectors
    fids = chosen["feature_id"][i]
    density = np.full(len(fids), np.nan)
    features = run_dir / schema.FEATURES
    if features.is_file():
        ft = pq.read_table(features, columns=["feature_id", "density"])
        f_ids = ft["feature_id"].to_numpy()
        f_dens = ft["density"].to_numpy(zero_copy_only=False).astype(np.float64)
        order = np.argsort(f_ids, kind="stable")
        pos = np.searchsorted(f_ids[order], fids)
        found = (pos < len(order)) & (f_ids[order][np.minimum(pos, len(order) - 1)] == fids)
        density[found] = f_dens[order][pos[found]]
    names = sorted(set(zip(chosen["explainer"][i].tolist(), chosen["prompt_version"][i].tolist(), strict=True)))
    code = {name: j for j, name in enumerate(names)}
    source = np.array([code[(a, b)] for a, b in zip(chosen["explainer"][i], chosen["prompt_version"][i], strict=True)],
                      np.int32)
    return {"ids": fids, "vectors": vectors, "density": density, "score": chosen["mean_score"][i], "source": source,
            "sources": [list(n) for n in names]}


def _index_model(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("model")
    except (OSError, ValueError):
        return None


class SemanticSearch:
    """Search a run's latents by the meaning of their best explanations. Create with ``SemanticSearch.open``."""

    def __init__(self, store: InterpStore, index: VectorIndex | None, model: str | None, own_store: bool):
        self.store = store
        self.index = index
        """None when the run has no explanation embeddings."""
        self.model = model
        self._own_store = own_store

    @classmethod
    def open(cls, run: str | Path | InterpStore, model: str | None = None, *, ivf_min: int = IVF_MIN,
             n_lists: int = N_LISTS, seed: int = 0, warm: bool = True) -> SemanticSearch:
        """Open (building once, then reusing) the search index of a run; ``model``: the embedding model (default:
        the one most explanations were embedded with); ``warm``: read the vectors once now (``VectorIndex.warm``)."""
        own = not isinstance(run, InterpStore)
        store = InterpStore.open(run) if not isinstance(run, InterpStore) else run
        models = store.embedding_models()
        if model is None:
            model = next(iter(models), None)
        if model is None or model not in models:
            return cls(store, None, model, own)
        run_dir = store.run_dir
        key_src = [INDEX_VERSION, store.signature, _file_key(run_dir / schema.FEATURES), model,
                   "ivf" if ivf_min else "exact", ivf_min, n_lists, seed]
        key = hashlib.sha256(json.dumps(key_src).encode()).hexdigest()[:24]
        root = run_dir / storage.INTERP_DIR / SEARCH_DIR
        writable = os.access(run_dir, os.W_OK) and (not root.parent.exists() or os.access(root.parent, os.W_OK))
        if not writable:
            root = fallback_dir(run_dir) / SEARCH_DIR
        folder = root / key
        if (folder / "meta.json").is_file():
            try:
                index = VectorIndex.load(folder)
                if warm:
                    index.warm()
                return cls(store, index, model, own)
            except (ValueError, OSError):
                shutil.rmtree(folder, ignore_errors=True)
        data = _run_vectors(run_dir, store, model)
        index = VectorIndex.build(folder, data["ids"], data["vectors"], data["density"], data["score"], data["source"],
                                  data["sources"], ivf_min=ivf_min, n_lists=n_lists, seed=seed, extra={"model": model})
        for old in root.iterdir():  # earlier indexes of this model (an open one stays readable until closed)
            if old.name != key and not old.name.startswith(".tmp-") and _index_model(old) in (model, None):
                shutil.rmtree(old, ignore_errors=True)
        if warm:
            index.warm()
        return cls(store, index, model, own)

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> SemanticSearch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return 0 if self.index is None else self.index.n

    def search(self, query: np.ndarray, k: int = 50, *, min_density: float | None = None, max_density: float | None = None,
               min_score: float | None = None, with_text: bool = True) -> list[Hit]:
        """The ``k`` latents whose best explanation is nearest ``query`` (a vector from ``Embedder.encode``)."""
        if self.index is None:
            return []
        hits = self.index.search(query, k, min_density=min_density, max_density=max_density, min_score=min_score)
        if not with_text or not hits:
            return hits
        texts = self.store.texts([(h.feature_id, h.explainer, h.prompt_version) for h in hits])
        return [Hit(h.feature_id, h.similarity, h.density, h.score, h.explainer, h.prompt_version,
                    texts.get((h.feature_id, h.explainer, h.prompt_version))) for h in hits]

    def search_text(self, text: str, embedder, k: int = 50, **filters) -> list[Hit]:
        """Embed ``text`` with ``embedder`` (an ``engine.interp.embed.Embedder``) and search."""
        return self.search(embedder.encode([text])[0], k, **filters)
