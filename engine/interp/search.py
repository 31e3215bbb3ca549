"""Search latents by meaning: rank the embeddings of their best explanations by cosine to a query vector.

``SemanticSearch.open(run_dir)`` indexes, per latent, the best-ranked usable non-baseline explanation that has an
embedding (``InterpStore.embedded_best``) with its mean score and the latent's density (``features.parquet``).
The index lives in ``<run>/.interp/search/<key>/`` as ``.npy`` files opened memory-mapped (in a temp folder when
the run directory is not writable); ``key`` hashes the source files' signature, so new explanations, scores or
embeddings make a new index and the old one is removed.

``VectorIndex`` (``engine.interp.vectors``) is the index itself: exact or IVF, with density and score filters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..run import schema as run_schema
from ..run.store import feature_densities, memory_limit
from . import schema
from .backends import SentenceEmbedder
from .index import fallback_dir, source_files
from .store import InterpStore
from .vectors import INDEX_VERSION, IVF_MIN, N_LISTS, N_PROBE, Hit, VectorIndex, unit

__all__ = ["IVF_MIN", "N_LISTS", "N_PROBE", "Hit", "SemanticSearch", "VectorIndex", "unit"]

SEARCH_DIR = "search"


def _file_key(path: Path) -> list:
    if not path.is_file():
        return [path.name, None]
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _embedding_rows(files: list[Path], ords: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``ords`` (row numbers counted through ``files`` in order) of the embedding column as one float32 matrix,
    streamed batch by batch (memory: the matrix and one batch; row groups without a wanted row are skipped), and
    which rows had a vector of the common length (``dim``, default the commonest in the first batch read; a null or
    odd-length one, from a foreign writer, is left out)."""
    order = np.argsort(ords, kind="stable")
    wanted = ords[order]
    out: np.ndarray | None = None if dim is None else np.zeros((len(ords), dim), np.float32)
    ok = np.zeros(len(ords), bool)
    base = 0
    for path in files:
        pf = pq.ParquetFile(path)
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            lo, hi = np.searchsorted(wanted, [base, base + rows])
            if hi == lo:  # no wanted row in this row group: not read (an update reads a few rows of a large file)
                base += rows
                continue
            for batch in pf.iter_batches(batch_size=65_536, columns=["embedding"], row_groups=[group]):
                n = batch.num_rows
                lo, hi = np.searchsorted(wanted, [base, base + n])
                if hi <= lo:
                    base += n
                    continue
                column = batch.column(0)
                local = wanted[lo:hi] - base
                lengths = np.asarray(column.value_lengths().fill_null(0))
                if out is None:
                    out = np.zeros((len(ords), int(np.bincount(lengths[local]).argmax())), np.float32)
                width = out.shape[1]
                offsets = np.asarray(column.offsets)
                values = np.asarray(column.values.to_numpy(zero_copy_only=False), np.float32)
                good = lengths[local] == width
                dest = order[lo:hi][good]
                starts = offsets[local[good]]
                if width and (lengths == width).all() and np.array_equal(offsets, offsets[0] + width * np.arange(n + 1)):
                    out[dest] = values[offsets[0] :].reshape(n, width)[local[good]]
                else:
                    for d, start in zip(dest, starts, strict=True):
                        out[d] = values[start : start + width]
                ok[dest] = width > 0
                base += n
    return (out if out is not None else np.zeros((len(ords), 0), np.float32)), ok


def _run_vectors(run_dir: Path, store: InterpStore, model: str, only: np.ndarray | None = None,
                 dim: int | None = None) -> dict:
    """The embedding of each latent's best embedded explanation (of the latents ``only``, when given), with its
    score, density and source."""
    chosen = store.embedded_best(model, only)
    files = source_files(run_dir, schema.EMBEDDINGS)
    key_columns = ["feature_id", "explainer", "prompt_version", "model"]
    sub = pa.schema([schema.EMBEDDINGS_SCHEMA.field(c) for c in key_columns])
    keys = pa.concat_tables([pq.read_table(f, columns=key_columns).cast(sub) for f in files] or [sub.empty_table()])
    keys = keys.append_column("_ord", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
    con = duckdb.connect(config={"memory_limit": memory_limit()})  # the same cap as a run's own connections
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
    vectors, ok = _embedding_rows(files, np.asarray(picked["_ord"], np.int64), dim)
    i = np.asarray(picked["i"], np.int64)[ok]
    vectors = vectors[ok] if not ok.all() else vectors
    fids = chosen["feature_id"][i]
    density = np.full(len(fids), np.nan)
    f_dens = feature_densities(run_dir)
    if f_dens is not None:
        found = (fids >= 0) & (fids < len(f_dens))
        density[found] = f_dens[fids[found]]
    names = sorted(set(zip(chosen["explainer"][i].tolist(), chosen["prompt_version"][i].tolist(), strict=True)))
    code = {name: j for j, name in enumerate(names)}
    source = np.array([code[(a, b)] for a, b in zip(chosen["explainer"][i], chosen["prompt_version"][i], strict=True)],
                      np.int32)
    return {"ids": fids, "vectors": vectors, "density": density, "score": chosen["mean_score"][i], "source": source,
            "sources": [list(n) for n in names]}


def _meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _index_model(folder: Path) -> str | None:
    return _meta(folder).get("model")


REBUILD_GROWTH = 2.0
"""An IVF index updated in place keeps its k-means lists until its size leaves [1/2, 2] x the size they were
trained on; then it is built again (lists trained on the current vectors)."""


def _update(root: Path, key: str, store: InterpStore, model: str, params: list, extra: dict, *, ivf_min: int,
            n_lists: int, seed: int) -> VectorIndex | None:
    """The index at ``root/key`` made from an earlier one of the same model and settings by replacing the rows of
    the latents whose explanations changed since it was built (``InterpStore.changed_since``): only those latents'
    vectors are read; an IVF index keeps its lists (``REBUILD_GROWTH``). None when there is no such index or the
    store cannot say what changed (it was rebuilt since): build from scratch."""
    if not root.is_dir():
        return None
    for old_folder in sorted(root.iterdir()):
        meta = _meta(old_folder)
        if old_folder.name.startswith(".tmp-") or meta.get("params") != params or "store_signature" not in meta:
            continue
        changed = store.changed_since(meta["store_signature"])
        if changed is None:
            continue
        try:
            old = VectorIndex.load(old_folder)
        except (ValueError, OSError):
            continue
        data = _run_vectors(store.run_dir, store, model, only=changed, dim=old.dim or None)
        keep = np.flatnonzero(~np.isin(old.ids, changed))
        sources = sorted({*(tuple(x) for x in old.sources), *(tuple(x) for x in data["sources"])})
        code = {name: j for j, name in enumerate(sources)}
        old_codes = np.array([code[tuple(x)] for x in old.sources], np.int32)
        new_codes = np.array([code[tuple(x)] for x in data["sources"]], np.int32)
        n = len(keep) + len(data["ids"])
        centroids = assign = None
        if old.is_ivf and n >= ivf_min:
            trained = int(meta.get("trained_n", old.n))
            if trained / REBUILD_GROWTH <= n <= trained * REBUILD_GROWTH:
                centroids = np.asarray(old.centroids)
                extra = {**extra, "trained_n": trained}
                # a kept row stays in its list (rows are stored list by list); only the new rows are assigned
                kept_lists = np.searchsorted(np.asarray(old.offsets), keep, side="right") - 1
                assign = np.concatenate([kept_lists, np.full(len(data["ids"]), -1)])
        return VectorIndex.build(
            root / key,
            np.concatenate([old.ids[keep], data["ids"]]).astype(np.int32),
            np.concatenate([old.vectors[keep], data["vectors"].reshape(-1, old.dim)]) if len(keep) else data["vectors"],
            np.concatenate([old.density[keep], data["density"]]),
            np.concatenate([old.score[keep], data["score"]]),
            np.concatenate([old_codes[old.source[keep]], new_codes[data["source"]]]).astype(np.int32),
            [list(x) for x in sources], ivf_min=ivf_min, n_lists=n_lists, seed=seed,
            extra={**extra, "updated_from": old_folder.name, "rows_replaced": int(old.n - len(keep)),
                   "rows_read": int(len(data["ids"]))}, centroids=centroids, assign=assign)
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
        key_src = [INDEX_VERSION, store.signature, _file_key(run_dir / run_schema.FEATURES), model,
                   "ivf" if ivf_min else "exact", ivf_min, n_lists, seed]
        key = hashlib.sha256(json.dumps(key_src).encode()).hexdigest()[:24]
        root = run_dir / schema.INTERP_DIR / SEARCH_DIR
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
        params = [key_src[0], *key_src[2:]]  # what an earlier index must share to be updated rather than rebuilt
        extra = {"model": model, "store_signature": store.signature, "params": params}
        updated = _update(root, key, store, model, params, extra, ivf_min=ivf_min, n_lists=n_lists, seed=seed)
        if updated is not None:
            index = updated
        else:
            data = _run_vectors(run_dir, store, model)
            index = VectorIndex.build(folder, data["ids"], data["vectors"], data["density"], data["score"],
                                      data["source"], data["sources"], ivf_min=ivf_min, n_lists=n_lists, seed=seed,
                                      extra=extra)
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

    def search_text(self, text: str, embedder: SentenceEmbedder, k: int = 50, **filters) -> list[Hit]:
        """Embed ``text`` with ``embedder`` (an ``engine.interp.embed.Embedder``) and search."""
        return self.search(embedder.encode([text])[0], k, **filters)
