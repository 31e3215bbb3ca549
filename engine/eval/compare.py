"""``saescope compare``: runs of SAEs on the same model and hook, side by side.

The runs are sorted by width and each is compared with the next wider one. Per pair: decoder-cosine matches
both ways, a one-to-one assignment (``matching``), and split candidates (``splitting``); then **one** pass of
the model and every SAE over a token sample of the narrowest run measures the activation correlation and
co-firing of all those pairs at once (``pairstats``). Each pair's results go to its comparison folder
(``storage``); with three runs or more, ``widths.parquet`` holds every run's eval card.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import lock
from ..model.loading import LoadedModel
from ..model.machine import cpu_facts
from ..run.loaded import load_run_model, load_run_sae
from ..run.manifest import sections
from ..run.store import RunStore
from . import files, schema
from .matching import DENSE_LIMIT, one_to_one, top_matches
from .pairstats import PairStats
from .runs import card, check_comparable
from .sample import sample_contexts, sample_pass
from .splitting import SplitCriteria, candidates, children, split_parents


@dataclass
class CompareConfig:
    """Settings of ``compare_runs`` (recorded in each ``comparison.json``)."""

    tokens: int = 32768
    """Sample tokens (whole contexts of the narrowest run) for activation correlations and co-firing."""
    batch_size: int = 16
    """Contexts per model forward."""
    candidates: int = 16
    """Most similar latents of B kept per latent of A: the sparsified similarity of the assignment, and the
    split candidates."""
    min_cos: float = 0.0
    """A one-to-one pair needs a decoder cosine above this."""
    method: str = "auto"
    """One-to-one assignment: ``auto``, ``lsa`` or ``greedy`` (see ``matching.DENSE_LIMIT``)."""
    split_cos: float = 0.5
    """See ``splitting.SplitCriteria``."""
    cofire: float = 0.5
    """See ``splitting.SplitCriteria``."""
    min_fires: int = 5
    """See ``splitting.SplitCriteria``."""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "candidates", "min_fires"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method not in ("auto", "lsa", "greedy"):
            raise ValueError(f"method must be auto, lsa or greedy, got {self.method!r}")
        for name in ("split_cos", "cofire"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def criteria(self) -> SplitCriteria:
        return SplitCriteria(self.split_cos, self.cofire, self.min_fires)


@dataclass
class _Pair:
    """One narrow-wide pair being compared."""

    a: int
    b: int
    folder: Path
    tables: dict
    pair_a: np.ndarray
    pair_b: np.ndarray
    method: str
    stats: PairStats | None = None


def compare_runs(run_dirs: list[str | Path], *, cfg: CompareConfig | None = None, out: str | Path | None = None,
                 lm: LoadedModel | None = None, device: str = "auto", dtype: str = "auto") -> list[Path]:
    """Compare runs (see the module docstring); returns the comparison folders written."""
    cfg = cfg or CompareConfig()
    if len(run_dirs) < 2:
        raise ValueError("compare needs two runs or more")
    if len({Path(r).resolve() for r in run_dirs}) < len(run_dirs):
        raise ValueError("the same run was given twice")
    with contextlib.ExitStack() as held:
        for r in run_dirs:  # no precompute --force may rewrite a run while it is compared
            held.enter_context(lock.hold(r, shared=True))
        stores = [held.enter_context(RunStore.open(r)) for r in run_dirs]
        return _compare(stores, cfg, out, lm, device, dtype)


def _compare(stores: list[RunStore], cfg: CompareConfig, out, lm, device, dtype) -> list[Path]:
    started = time.perf_counter()
    check_comparable(stores)
    stores = sorted(stores, key=lambda s: int(sections(s.manifest()).sae.d_sae or 0))
    lm = load_run_model(stores[0].manifest(), f"run {stores[0].run_dir}", lm=lm, device=device, dtype=dtype)
    saes = [load_run_sae(s.manifest(), f"run {s.run_dir}", device=lm.device) for s in stores]
    timings = {"load_seconds": time.perf_counter() - started}

    tick = time.perf_counter()
    pairs = [_match(i, i + 1, stores, saes, cfg, out) for i in range(len(stores) - 1)]
    timings["matching_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    contexts = sample_contexts(stores[0], cfg.tokens)
    for p in pairs:
        p.stats = PairStats(p.pair_a, p.pair_b, saes[p.a].cfg.d_sae, saes[p.b].cfg.d_sae)
    n_tokens = 0
    for batch in sample_pass(lm, saes, contexts, cfg.batch_size):
        n_tokens += len(batch.x)
        for p in pairs:
            assert p.stats is not None
            p.stats.update(batch.outputs[p.a].codes, batch.outputs[p.b].codes)
    timings["sample_pass_seconds"] = time.perf_counter() - tick
    timings["sample_tokens_per_second"] = n_tokens / max(timings["sample_pass_seconds"], 1e-9)

    written = []
    for p in pairs:
        info = _finish(p, stores, cfg, n_tokens, len(contexts), timings, str(lm.device))
        written.append(files.write_folder(p.folder, p.tables, info))
    if len(stores) >= 3:
        cards = [card(s) for s in stores]
        table = {name: [c[name] for c in cards] for name in schema.WIDTHS_SCHEMA.names}
        target = Path(out) if out is not None else Path(stores[0].run_dir) / schema.COMPARE_DIR
        target.mkdir(parents=True, exist_ok=True)
        from ..run.parquet import write_table

        write_table(target / schema.WIDTHS, table, schema.WIDTHS_SCHEMA)
    return written


def _match(a: int, b: int, stores, saes, cfg: CompareConfig, out) -> _Pair:
    """Decoder matches of run ``a`` (narrower) with run ``b``, and the pairs the sample pass must measure."""
    w_a, w_b = saes[a].decoder_directions(), saes[b].decoder_directions()
    top = top_matches(w_a, w_b, cfg.candidates)
    back = top_matches(w_b, w_a, 1)
    assign = one_to_one(top, w_b.shape[0], min_cos=cfg.min_cos, method=cfg.method)
    n_a, n_b = w_a.shape[0], w_b.shape[0]
    cand_a, cand_b, cand_cos = candidates(top, cfg.split_cos)
    ids = np.arange(n_a)
    matched = assign.partner >= 0
    # every pair whose activations are compared, measured once: best matches, assigned pairs, split candidates
    keys = np.unique(np.concatenate([ids * n_b + top.ids[:, 0], ids[matched] * n_b + assign.partner[matched],
                                     cand_a * n_b + cand_b]))
    partner_a = np.full(n_b, -1, dtype=np.int64)
    partner_a[assign.partner[matched]] = ids[matched]
    second = top.ids.shape[1] > 1
    tables = {
        schema.MATCHES: {
            "a_id": ids, "best_b": top.ids[:, 0], "best_cos": top.cos[:, 0],
            "second_b": top.ids[:, 1] if second else np.full(n_a, -1),
            "second_cos": top.cos[:, 1] if second else np.full(n_a, np.nan),
            "partner_b": assign.partner, "partner_cos": assign.cos,
        },
        schema.MATCHES_B: {"b_id": np.arange(n_b), "best_a": back.ids[:, 0], "best_cos": back.cos[:, 0], "partner_a": partner_a},
        schema.PAIRS: {"a_id": cand_a, "b_id": cand_b, "cos": cand_cos},
    }
    folder = files.default_folder(stores[a].run_dir, stores[b].run_dir, out)
    return _Pair(a, b, folder, tables, keys // n_b, keys % n_b, assign.method)


def _finish(p: _Pair, stores, cfg: CompareConfig, n_tokens: int, n_contexts: int, timings: dict, device: str) -> dict:
    """Fill the pair's tables from the sample statistics; returns its ``comparison.json``."""
    assert p.stats is not None
    res = p.stats.result()
    n_b = len(res.fires_b)
    keys = p.pair_a * n_b + p.pair_b

    def lookup(a_ids: np.ndarray, b_ids: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
        """``values`` of pairs (a_ids, b_ids) (``fill`` where b_ids is -1)."""
        pos = np.searchsorted(keys, a_ids * n_b + np.maximum(b_ids, 0))
        out = values[np.minimum(pos, len(keys) - 1)]
        return np.where(b_ids >= 0, out, fill)

    m, mb, pr = p.tables[schema.MATCHES], p.tables[schema.MATCHES_B], p.tables[schema.PAIRS]
    m["best_corr"] = lookup(m["a_id"], m["best_b"], res.corr, np.nan)
    m["partner_corr"] = lookup(m["a_id"], m["partner_b"], res.corr, np.nan)
    m["a_fires"] = res.fires_a
    mb["b_fires"] = res.fires_b
    n_both = lookup(pr["a_id"], pr["b_id"], res.n_both, 0)
    a_fires, b_fires = res.fires_a[pr["a_id"]], res.fires_b[pr["b_id"]]
    child = children(n_both, a_fires, b_fires, cfg.criteria)
    pr.update(
        corr=lookup(pr["a_id"], pr["b_id"], res.corr, np.nan), n_both=n_both, a_fires=a_fires, b_fires=b_fires,
        p_a_given_b=np.divide(n_both, b_fires, out=np.full(len(n_both), np.nan), where=b_fires > 0),
        p_b_given_a=np.divide(n_both, a_fires, out=np.full(len(n_both), np.nan), where=a_fires > 0), child=child,
    )
    parents = split_parents(pr["a_id"], child)
    m["n_children"] = np.bincount(pr["a_id"][child], minlength=len(m["a_id"]))
    # nulls, not sentinels, in the files
    m["partner_b"] = [None if j < 0 else int(j) for j in m["partner_b"]]
    mb["partner_a"] = [None if i < 0 else int(i) for i in mb["partner_a"]]
    m["second_b"] = [None if j < 0 else int(j) for j in m["second_b"]]
    for t in (m, pr):
        for key in ("best_corr", "partner_corr", "partner_cos", "second_cos", "corr", "p_a_given_b", "p_b_given_a"):
            if key in t:
                t[key] = [None if np.isnan(v) else float(v) for v in t[key]]

    best_cos, partner_cos = np.asarray(m["best_cos"]), np.array([np.nan if v is None else v for v in m["partner_cos"]])
    corr = np.array([np.nan if v is None else v for v in m["partner_corr"]])
    a_store, b_store = stores[p.a], stores[p.b]
    facts = cpu_facts()
    return {
        "a": {**card(a_store), "model": sections(a_store.manifest()).model.name,
              "sae_hash": sections(a_store.manifest()).sae.hash},
        "b": {**card(b_store), "sae_hash": sections(b_store.manifest()).sae.hash},
        "hook": sections(a_store.manifest()).sae.hook,
        "settings": asdict(cfg),
        "assignment": {"method": p.method, "cells": len(best_cos) * n_b, "dense_limit": DENSE_LIMIT},
        "sample": {"n_tokens": n_tokens, "n_contexts": n_contexts, "from_run": str(stores[0].run_dir)},
        "summary": {
            "mean_best_cos": float(best_cos.mean()), "median_best_cos": float(np.median(best_cos)),
            "frac_best_cos_over_0.9": float((best_cos > 0.9).mean()), "frac_best_cos_over_0.7": float((best_cos > 0.7).mean()),
            "n_assigned": int(np.isfinite(partner_cos).sum()),
            "mean_assigned_cos": float(np.nanmean(partner_cos)) if np.isfinite(partner_cos).any() else None,
            "mean_assigned_corr": float(np.nanmean(corr)) if np.isfinite(corr).any() else None,
            "median_assigned_corr": float(np.nanmedian(corr)) if np.isfinite(corr).any() else None,
            "n_split": len(parents), "n_children": int(sum(parents.values())),
            "frac_b_best_cos_over_0.9": float((np.asarray(mb["best_cos"]) > 0.9).mean()),
        },
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "machine": {"cpu": facts.model, "threads": facts.threads, "device": device},
    }
