"""``saescope export RUN --format neuronpedia|jsonl OUT``: a run's latents in a form other tools read.

``neuronpedia`` writes the folder Neuronpedia's importer reads (``neuronpedia.py``); ``jsonl`` one JSON object per
latent (docs/export.md). Either is written beside ``OUT`` under a hidden ``.partial`` name and renamed into place
when complete, so an interrupted export leaves no ``OUT`` at all, and a replaced one (``force``) is swapped whole.
Runs are read through ``RunStore.iter_features`` and explanations through ``InterpStore.best``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .. import atomic, lock
from ..run.rows import FeatureRow
from ..run.store import RunStore
from . import neuronpedia as np_fmt

FORMATS = ("neuronpedia", "jsonl")
READ_BATCH = 256
"""Latents read per query: their examples are Python objects until written (~70 MB per 256 latents of 70 examples)."""


@dataclass(frozen=True)
class NeuronpediaOptions:
    """Names the Neuronpedia records carry; the defaults come from the run's manifest."""

    model_id: str | None = None
    """Neuronpedia model id (default: the model's name, lower-cased)."""
    source_set: str | None = None
    """Source set name, e.g. ``saescope-res-4k`` (default: from the hook kind and width)."""
    layer: int | None = None
    """Layer number in the source id ``<layer>-<source_set>`` (default: from the hook name)."""
    creator_id: str = np_fmt.DEFAULT_CREATOR_ID
    """Neuronpedia user id that owns the rows (default: the user a fresh instance seeds)."""
    creator_name: str = "saescope"
    release: str | None = None
    """Release name (default: the source set name)."""
    description: str | None = None
    visibility: str = "PUBLIC"

    def __post_init__(self) -> None:
        if self.visibility not in np_fmt.VISIBILITIES:
            raise ValueError(f"visibility must be one of {', '.join(np_fmt.VISIBILITIES)}, got {self.visibility!r}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    out: Path
    format: str
    n_features: int
    n_examples: int
    n_explanations: int
    seconds: float
    source_dir: Path | None = None
    """Neuronpedia: the ``<modelId>/<sourceId>`` folder inside ``out`` to import."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


EXPORT_MARK = ".saescope-export.json"
"""Written into every folder export: ``--force`` replaces a folder only when it carries this mark."""


def check_out(run_dir: Path, out: Path, force: bool) -> None:
    """Refuse an ``out`` that is, holds or lies inside the run, and (even with ``force``) one that exists and is not
    an earlier export: ``--force`` replaces an export, never a folder or file of something else."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run.is_relative_to(target) or target.is_relative_to(run):
        raise ValueError(f"refusing to export {run_dir} to {out}: the output would replace or sit inside the run "
                         "itself; choose a folder outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    if out.is_dir():
        if not (out / EXPORT_MARK).is_file():
            raise FileExistsError(f"{out} is not an earlier saescope export (no {EXPORT_MARK}): --force replaces only "
                                  "an export; choose another output")
    elif not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise FileExistsError(f"{out} is a file that is not a jsonl export: --force replaces only an export")


@contextmanager
def written_aside(out: Path, force: bool) -> Iterator[Path]:
    """A sibling path to write ``out`` into; renamed to ``out`` when the block ends normally, removed otherwise."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.aside(out)
    try:
        yield tmp
        if tmp.is_dir():
            atomic.replace_dir(tmp, out)  # the old export stays whole until the new one is
        else:
            atomic.fsync_file(tmp)
            if out.is_dir():
                _remove(out)
            os.replace(tmp, out)
            atomic.fsync_dir(out.parent)
    except BaseException:
        _remove(tmp)
        raise


def _best_explanations(run_dir: Path) -> dict[int, Any]:
    from ..interp.store import InterpStore

    with InterpStore.open(run_dir) as interp:
        return interp.best()


def _explanation_of(feature: FeatureRow, best: dict[int, Any]) -> tuple[str, str, dict] | None:
    """(text, explainer, scores) of a latent's best explanation, else its ``explanation`` column."""
    found = best.get(feature.feature_id)
    if found is not None and found.text:
        return found.text, found.explainer, {k: v for k, v in found.scores.items() if v is not None}
    if feature.explanation:
        return feature.explanation, "", {}
    return None


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "neuronpedia", *, force: bool = False,
               options: NeuronpediaOptions | None = None, batch_features: int = np_fmt.BATCH_FEATURES,
               progress: bool = False) -> ExportSummary:
    """Export a run (see the module docstring); returns what was written."""
    import time

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    check_out(run_dir, out, force)  # before opening anything
    with lock.hold(run_dir, shared=True), RunStore.open(run_dir) as store:
        best = _best_explanations(run_dir)
        with written_aside(out, force) as tmp:
            if fmt == "jsonl":
                counts = _write_jsonl(store, best, tmp, gz=out.name.endswith(".gz"), progress=progress)
                source_dir = None
            else:
                counts, rel = _write_neuronpedia(store, best, tmp, options or NeuronpediaOptions(), batch_features,
                                                 progress)
                atomic.write_json(tmp / EXPORT_MARK, {"run": str(run_dir.resolve()), "format": fmt})
                source_dir = out / rel
    return ExportSummary(out, fmt, *counts, seconds=time.perf_counter() - started, source_dir=source_dir)


def _open_text(path: Path, gz: bool) -> IO[str]:
    return gzip.open(path, "wt", encoding="utf-8", compresslevel=5) if gz else path.open("w", encoding="utf-8")


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _progress(i: int, total: int, enabled: bool) -> None:
    if enabled and (i % 1024 == 0 or i == total):
        print(f"\rexport: {i:,}/{total:,} latents", end="\n" if i == total else "", file=sys.stderr, flush=True)


# --- jsonl -----------------------------------------------------------------------------------------------------
def jsonl_record(feature: FeatureRow, decode, explained: tuple[str, str, dict] | None) -> dict[str, Any]:
    """One latent as the ``jsonl`` format's object (docs/export.md)."""
    def tokens(ids, values=None):
        names = decode(ids)
        if values is None:
            return [{"token_id": int(i), "token": t} for i, t in zip(ids, names, strict=True)]
        return [{"token_id": int(i), "token": t, "value": float(v)} for i, t, v in zip(ids, names, values, strict=True)]

    return {
        "feature_id": feature.feature_id, "density": feature.density, "fire_count": feature.fire_count,
        "max_act": feature.max_act, "mean_act": feature.mean_act, "dead": feature.dead, "label": feature.label,
        "explanation": explained[0] if explained else None,
        "explainer": explained[1] if explained else None,
        "explanation_scores": explained[2] if explained else None,
        "histogram": {"counts": feature.hist_counts or [], "edges": feature.hist_edges or []},
        "logits": {"promoted": tokens(feature.top_logit_ids or [], feature.top_logit_values or []),
                   "suppressed": tokens(feature.bottom_logit_ids or [], feature.bottom_logit_values or [])},
        "neighbours": [{"feature_id": int(i), "cos": float(c)}
                       for i, c in zip(feature.neighbor_ids or [], feature.neighbor_cos or [], strict=True)],
        "top_tokens": tokens(feature.top_token_ids or []),
        "examples": [ex._asdict() for ex in feature.examples],
    }


def _write_jsonl(store: RunStore, best: dict, path: Path, gz: bool, progress: bool) -> tuple[int, int, int]:
    n = n_examples = n_explained = 0
    total = store.n_features()
    with _open_text(path, gz) as f:
        for feature in store.iter_features(batch_size=READ_BATCH):
            explained = _explanation_of(feature, best)
            f.write(_dumps(jsonl_record(feature, store.decode, explained)) + "\n")
            n, n_examples, n_explained = n + 1, n_examples + len(feature.examples), n_explained + bool(explained)
            _progress(n, total, progress)
    return n, n_examples, n_explained


# --- neuronpedia ---------------------------------------------------------------------------------------------------
def _write_neuronpedia(store: RunStore, best: dict, root: Path, opts: NeuronpediaOptions, batch_features: int,
                       progress: bool) -> tuple[tuple[int, int, int], Path]:
    manifest = store.manifest()
    model_default, set_default, layer_default = np_fmt.default_names(manifest)
    model_id = np_fmt.check_id(opts.model_id or model_default, "model id")
    set_name = np_fmt.check_id(opts.source_set or set_default, "source set")
    layer = opts.layer if opts.layer is not None else layer_default
    if layer is None:
        raise ValueError(f"cannot tell the layer from hook {manifest.get('sae', {}).get('hook')!r}: pass --layer")
    source_id = f"{layer}-{set_name}"
    release = np_fmt.check_id(opts.release or set_name, "release")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    sae, corpus, model = manifest.get("sae", {}), manifest.get("corpus", {}), manifest.get("model", {})
    run_hash = f"{model.get('hash')}:{sae.get('hash')}:{corpus.get('hash')}"
    hook = str(sae.get("hook") or "")
    description = opts.description or f"{hook} - {sae.get('d_sae')} latents ({sae.get('architecture')})"
    common = {"model_id": model_id, "source_id": source_id, "creator_id": opts.creator_id, "created": created}
    folder = root / model_id / source_id
    folder.mkdir(parents=True)
    meta = {
        "release.jsonl": {
            "name": release, "description": description, "descriptionShort": description, "creatorName": opts.creator_name,
            "creatorNameShort": opts.creator_name, "creatorId": opts.creator_id, "visibility": opts.visibility,
            "urls": [], "createdAt": created,
        },
        "model.jsonl": {
            "id": model_id, "instruct": "instruct" in model_id or model_id.endswith("-it"), "creatorId": opts.creator_id,
            "displayNameShort": model_id, "displayName": str(model.get("name") or model_id),
            "dimension": int(model.get("d_model") or 0), "visibility": opts.visibility, "inferenceEnabled": False,
            "layers": int(model.get("n_layers") or 0), "neuronsPerLayer": 0, "owner": opts.creator_name,
            "createdAt": created, "updatedAt": created,
        },
        "sourceset.jsonl": {
            "modelId": model_id, "name": set_name, "creatorId": opts.creator_id, "hasDashboards": True,
            "visibility": opts.visibility, "description": description, "type": "", "creatorName": opts.creator_name,
            "urls": [], "releaseName": release, "createdAt": created,
        },
        "source.jsonl": {
            "id": source_id, "modelId": model_id, "setName": set_name, "creatorId": opts.creator_id,
            "hasDashboards": True, "inferenceEnabled": False, "visibility": opts.visibility,
            "num_prompts": int(corpus.get("n_contexts") or 0), "num_tokens_in_prompt": int(corpus.get("context_len") or 0),
            "dataset": str(corpus.get("name") or ""), "createdAt": created,
            "notes": f"exported by saescope from a run of {corpus.get('n_tokens')} tokens (SAE {sae.get('path')})",
            **release_fields(str(sae.get("path") or "")),
        },
    }
    for name, record in meta.items():
        np_fmt.validate(np_fmt.FILES[name], record)
        (folder / name).write_text(_dumps(record) + "\n", encoding="utf-8")
    for sub in ("features", "activations", "explanations"):
        (folder / sub).mkdir()
    total = store.n_features()
    n = n_examples = n_explained = 0
    stream = store.iter_features(batch_size=READ_BATCH)
    while (first := next(stream, None)) is not None:  # one file batch at a time, streamed: memory stays flat
        batch = itertools.chain([first], itertools.islice(stream, batch_features - 1))
        counts = _neuronpedia_batch(folder, n // batch_features, batch, store.decode, best, common, set_name,
                                    run_hash, str(corpus.get("name") or ""), validate=n == 0)
        n, n_examples, n_explained = n + counts[0], n_examples + counts[1], n_explained + counts[2]
        _progress(n, total, progress)
    return (n, n_examples, n_explained), Path(model_id) / source_id


def release_fields(sae_path: str) -> dict[str, str]:
    """Source fields naming the SAELens release, SAE id, hub repository and folder of an SAE loaded by release."""
    from ..saes import releases

    found = None if Path(sae_path).exists() else releases.parse_release(sae_path)
    if found is None:
        return {}
    entry = releases.registry()[found[0]]
    return {"saelensRelease": found[0], "saelensSaeId": found[1], "hfRepoId": entry.repo_id, "hfFolderId": entry.saes[found[1]]}


def _neuronpedia_batch(folder: Path, index: int, batch: Iterable[FeatureRow], decode, best: dict, common: dict,
                       set_name: str, run_hash: str, data_source: str, validate: bool) -> tuple[int, int, int]:
    """Write one ``batch-N.jsonl.gz`` of each table; returns (latents, examples, explanations) written."""
    name = f"batch-{index}.jsonl.gz"
    n_features = n_examples = n_explained = 0
    with _open_text(folder / "features" / name, True) as features, \
            _open_text(folder / "activations" / name, True) as activations:
        explanations: list[str] = []
        for feature in batch:
            n_features += 1
            record = np_fmt.neuron(feature, decode, set_name=set_name, **common)
            if validate:
                np_fmt.validate("Neuron", record)
            features.write(_dumps(record) + "\n")
            for example in feature.examples:
                act = np_fmt.activation(example, feature, data_source=data_source, run_hash=run_hash, **common)
                if validate:
                    np_fmt.validate("Activation", act)
                activations.write(_dumps(act) + "\n")
            n_examples += len(feature.examples)
            explained = _explanation_of(feature, best)
            if explained:
                text, explainer, scores = explained
                notes = "; ".join([f"saescope explainer {explainer or 'unknown'}"] +
                                  [f"{k} {v:.3f}" for k, v in sorted(scores.items())])
                record = np_fmt.explanation(feature.feature_id, text, notes=notes, key=run_hash, **common)
                if validate:
                    np_fmt.validate("Explanation", record)
                explanations.append(_dumps(record) + "\n")
        n_explained = len(explanations)
    if explanations:
        with _open_text(folder / "explanations" / name, True) as f:
            f.writelines(explanations)
    return n_features, n_examples, n_explained
