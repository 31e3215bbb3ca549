"""The vector index behind search by meaning: exact below ``IVF_MIN`` vectors, IVF (spherical k-means lists) above.

* below ``IVF_MIN`` vectors it is exact: one float32 matrix-vector product over all of them;
* from ``IVF_MIN`` on it is an IVF index: spherical k-means (``N_LISTS`` centroids trained on a sample) splits
  the vectors into lists stored contiguously, a query scans the ``n_probe`` lists whose centroids are nearest and
  re-ranks their vectors exactly. An exact float32 product over 1M x 384 streams 1.5 GB (about 115 ms on one
  thread of a 2-core Xeon); 32 of 1024 lists stream about 3% of it (about 4 ms).

Filters (density range, minimum score) apply before the top ``k`` is taken. Row permutations sorted by density
and by score count the rows a filter keeps in microseconds: a small filtered set is searched exactly (its rows
gathered); a large one with IVF probes more lists (``n_probe / sqrt(fraction kept)``, then more until ``k``
candidates pass). ``engine.interp.search`` builds one per run from its explanation embeddings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
              ivf_min: int = IVF_MIN, n_lists: int = N_LISTS, seed: int = 0, extra: dict | None = None,
              centroids: np.ndarray | None = None, assign: np.ndarray | None = None) -> VectorIndex:
        """Write an index of ``vectors`` (``[n, dim]``, normalised here) into ``folder`` (created aside and renamed
        into place) and open it. ``density``/``score`` (NaN: unknown) feed the filters; ``source`` indexes
        ``sources`` (explainer, prompt version) per row. ``centroids``: an IVF index's lists, reused instead of
        trained (an update of an index whose vectors mostly stayed), with ``assign`` the list of each row where
        already known (-1: to be found)."""
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
                if centroids is None:
                    rng = np.random.default_rng(seed)
                    sample = np.sort(rng.choice(n, size=min(n, n_lists * TRAIN_PER_LIST), replace=False))
                    centroids = spherical_kmeans(unit(vectors[sample]), n_lists, seed=seed)
                    meta["trained_n"] = n
                else:
                    meta["trained_n"] = int((extra or {}).get("trained_n", n))
                if assign is None:
                    assign = _nearest(vectors, centroids, normalise=True)
                else:
                    assign = np.asarray(assign, np.int64).copy()
                    todo = np.flatnonzero(assign < 0)
                    assign[todo] = _nearest(vectors[todo], centroids, normalise=True)
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
