"""Turning the streaming pass's state into a run on disk: snapshots while the pass goes on, the run at its end.

A snapshot is a complete run of the contexts seen so far (every file, its own DuckDB index, a manifest whose
``snapshot.final`` is false), published atomically by ``rundir.publish_snapshot``; it is exact for the tokens
it covers, because every accumulator is read without being changed. The first comes after
``snapshot_tokens`` tokens; each later one once the token count has doubled *and* ten times the previous
snapshot's cost has passed, so snapshots never take more than ~10% of the run; and only while the pass still
has a minute or more to go (a shorter run is browsed when it ends).

Next-token losses (clean, with the SAE spliced in, zero-ablated) are scored on ``ce_contexts`` of the sampled
contexts: one per ``ce_every`` contexts of the run, at most ``sample_contexts``. For residual-stream hooks
they run from the activations the pass stored, through only the layers after the hook; a context scored for
one snapshot keeps its losses for the next.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import settings
from ..analysis.metrics import CEMetrics, ce_totals, explained_variances, per_token_ce, per_token_ce_from_acts, summarize_ce
from ..data.corpus import corpus_hash
from ..model.tail import can_resume
from ..model.tokens import token_strings
from ..run import parquet, rundir, schema
from ..run.index import build_index
from ..run.loaded import local_path
from . import runfiles
from .sampling import ContextSample

LOSS_KEYS = ("clean", "sae", "zero", "kl", "kl_zero")
"""Per-prediction rows kept for each scored context (``per_token_ce``'s keys: losses clean / with the SAE /
zero-ablated, KL(clean || with SAE), KL(clean || zero-ablated))."""
CE_KEYS = tuple(CEMetrics.__dataclass_fields__)
"""The CE keys of ``manifest.metrics``: every ``CEMetrics`` field (``to_dict(extended=True)``)."""
SNAPSHOT_COST_FACTOR = 10.0
"""A later snapshot waits at least this many times the previous one's cost."""
SNAPSHOT_MIN_REMAINING = settings.get(settings.SNAPSHOT_MIN_SECONDS, 60.0)
"""Seconds the pass must still have to go (at its throughput so far) for a snapshot to be worth publishing: a run
that ends sooner is browsed when it ends (``$SAESCOPE_SNAPSHOT_MIN_SECONDS``, default 60)."""


def encoder_rule(sae) -> dict[str, Any]:
    """The manifest's statement of how a batch- or gradient-dependent encoder encoded the run's tokens (and the
    Matryoshka groups), empty for the other SAEs."""
    out: dict[str, Any] = {}
    if sae.cfg.inference_rule:
        out["inference_rule"] = sae.cfg.inference_rule
    if sae.needs_loss_gradient:
        out["gradient"] = {
            "source": "each context's summed next-token loss, teacher-forced: one full forward and backward per batch",
            "fallback": "the last position of each context (no next-token label, zero gradient): plain TopK over z",
            "spliced_forwards": "CE loss with the SAE spliced in, the lens and steering have no gradient: plain TopK over z",
        }
    if sae.cfg.matryoshka_widths:
        out["matryoshka_widths"] = list(sae.cfg.matryoshka_widths)
    batch = sae.cfg.metadata.get("batch_tokens")
    if sae.cfg.architecture == "feature_choice" and sae.cfg.k and isinstance(batch, int) and batch > 0:
        # each latent's cap: the share of a training batch the rule let it pick
        out["capacity_density"] = max(1, sae.cfg.k * batch // sae.cfg.d_sae) / batch
    return out


def ce_contexts(n_contexts: int, cfg) -> int:
    """How many sampled contexts get their losses scored in a run of ``n_contexts`` contexts."""
    if cfg.sample_contexts == 0:
        return 0
    return min(cfg.sample_contexts, max(1, n_contexts // cfg.ce_every))


@dataclass(frozen=True)
class RunTarget:
    """One run being written: what it is computed from, with which settings, and where it goes (passed whole)."""

    lm: Any
    """The model (``LoadedModel``)."""
    sae: Any
    """The SAE as loaded (its fingerprint names the run)."""
    run_sae: Any
    """The SAE as the pass runs it (``compute_copy``: the model's device and, where faster, dtype)."""
    hook: str
    corpus: str | Path
    cfg: Any
    """The run's ``PrecomputeConfig``."""
    staging: Path
    """Where the final files are written before they move into ``out_dir``."""
    out_dir: Path
    identity: dict
    """``{"model_hash", "sae_hash"}``."""
    sae_path: str | Path | None
    target_tokens: int | None
    """Tokens the pass will process (None: not known in advance)."""
    started: float
    """``time.perf_counter()`` when the run started."""


class RunWriter:
    """Writes snapshots and the final run of one precompute (see the module docstring)."""

    def __init__(self, run: RunTarget):
        self.run = run
        self.lm, self.sae, self.run_sae, self.hook, self.corpus, self.cfg = (
            run.lm, run.sae, run.run_sae, run.hook, run.corpus, run.cfg)
        self.staging, self.out_dir, self.identity, self.sae_path = run.staging, Path(run.out_dir), run.identity, run.sae_path
        self.target_tokens, self.started = run.target_tokens, run.started
        self.writer_id = rundir.writer_identity()
        self.snapshots = 0
        self.failed_snapshots: list[str] = []
        """Why each snapshot that could not be written failed (recorded in the manifest's timings)."""
        self.timings = {"snapshot_seconds": 0.0, "ce_sample_seconds": 0.0, "features_seconds": 0.0, "write_seconds": 0.0}
        self._facts: dict | None = None
        self._vocab: list[str] | None = None
        self._losses: dict[int, dict[str, torch.Tensor]] = {}
        self._next_tokens = run.cfg.snapshot_tokens or 0
        self._next_time = 0.0
        self._pass_started = time.perf_counter()
        # a transcoder's splice replaces a later hook than the one the sample stores: spliced by full forwards
        self._resume = can_resume(run.lm, run.hook) and not run.sae.is_transcoder

    # --- snapshots ---------------------------------------------------------------------------------
    def snapshot_due(self, n_seen_tokens: int) -> bool:
        """Whether a snapshot should be written now, after ``n_seen_tokens`` tokens of the pass."""
        if not self._next_tokens or n_seen_tokens < self._next_tokens or time.perf_counter() < self._next_time:
            return False
        if self.target_tokens is None:
            return True
        # the final run is near: a snapshot now would only delay it
        elapsed = time.perf_counter() - self._pass_started - self.timings["snapshot_seconds"]
        remaining = (self.target_tokens - n_seen_tokens) * elapsed / max(n_seen_tokens, 1)
        return n_seen_tokens < 0.75 * self.target_tokens and remaining >= SNAPSHOT_MIN_REMAINING

    def snapshot(self, state, contexts: parquet.ContextWriter, timings: dict) -> dict | None:
        """Write and publish a snapshot of ``state``; returns its manifest (None: it failed, was logged and
        removed, and the previous snapshot stays published)."""
        tick = time.perf_counter()
        self.snapshots += 1
        folder = rundir.snapshot_dir(self.out_dir, self.snapshots)
        manifest = None
        try:
            contexts.export(folder / schema.CONTEXTS)
            manifest = self._write(state, folder, final=False, timings=timings)
            rundir.publish_snapshot(self.out_dir, folder, manifest)
            self.timings.setdefault("first_snapshot_seconds", time.perf_counter() - self.started)
        except (OSError, MemoryError, RuntimeError) as err:  # disk full, out of memory (torch's is a RuntimeError)
            # a snapshot is a convenience: the previous one stays published and the pass goes on
            shutil.rmtree(folder, ignore_errors=True)
            self.snapshots -= 1
            self.failed_snapshots.append(f"{type(err).__name__}: {err}")
            print(f"\nprecompute: a snapshot failed ({type(err).__name__}: {err}); the previous snapshot stays "
                  "published and the pass goes on", file=sys.stderr, flush=True)
        cost = time.perf_counter() - tick
        self.timings["snapshot_seconds"] += cost
        seen = state.n_contexts * self.cfg.context_len
        self._next_tokens, self._next_time = 2 * seen, time.perf_counter() + SNAPSHOT_COST_FACTOR * cost
        return manifest

    def final(self, state, contexts: parquet.ContextWriter | None, timings: dict) -> dict:
        """Write the finished run into the staging folder and swap it in; returns the manifest. ``contexts`` is
        None when the staging folder already holds the contexts file (a sharded run's merge)."""
        if contexts is not None:
            contexts.close()
        manifest = self._write(state, self.staging, final=True, timings=timings)
        rundir.finalize(self.out_dir, self.staging, manifest)
        return manifest

    # --- one complete run of the state ---------------------------------------------------------------
    def _write(self, state, folder: Path, *, final: bool, timings: dict) -> dict:
        lm, sae, cfg = self.lm, self.sae, self.cfg
        tick = time.perf_counter()
        slots = state.sample.taken()
        losses = self._sample_losses(state.sample, slots, state.sample.scored(ce_contexts(state.n_contexts, cfg)))
        ce_seconds = time.perf_counter() - tick

        tick = time.perf_counter()
        error_map = state.dark.fit(cfg.ridge)
        token_rows, norm_corr = runfiles.token_rows(state.sample, slots, error_map, losses)
        summary = state.stats.summary()
        if self._vocab is None:
            self._vocab = token_strings(lm.tokenizer, max(lm.unembed_matrix().shape[0], len(lm.tokenizer)))
        if self._facts is not None:
            facts = self._facts
        elif not final and self.snapshots == 1 and runfiles.costly_facts(sae.cfg.d_sae, cfg):
            # a wide run's first snapshot: without the weight-only facts (the IVF search takes minutes), which the
            # next snapshot or the final run computes; the feature page computes a latent's logit effects
            facts = runfiles.latent_facts(lm, sae, cfg, pending=True)
        else:
            facts = self._facts = runfiles.latent_facts(lm, sae, cfg)
        labels, top_tokens, head_data = runfiles.write_examples(folder, state.examples, self._vocab)
        features = runfiles.feature_columns(facts, summary, labels, top_tokens, head_data)
        features_seconds = time.perf_counter() - tick

        tick = time.perf_counter()
        sizes = runfiles.write_files(folder, features, self._vocab, token_rows, error_map)
        build_index(folder)
        write_seconds = time.perf_counter() - tick
        if final:
            self.timings.update(ce_sample_seconds=ce_seconds, features_seconds=features_seconds, write_seconds=write_seconds)

        metrics = state.recon.summary()
        metrics.update(explained_variances(state.recon, state.recon_massive, cfg.include_massive))
        dead = np.nonzero(summary.fire_count == 0)[0]
        metrics.update(
            n_dead=int(len(dead)),
            dead_fraction=float(len(dead) / len(summary.fire_count)),
            dense_fraction=float((summary.density > 0.1).mean()),
        )
        # null: no CE sample
        metrics.update(losses["metrics"].to_dict(extended=True) if losses is not None else dict.fromkeys(CE_KEYS))
        seen = state.n_contexts * cfg.context_len
        return {
            "schema_version": schema.SCHEMA_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "snapshot": {"final": final, "index": self.snapshots, "n_tokens": state.n_tokens, "seen_tokens": seen,
                         "target_tokens": self.target_tokens, **self.writer_id},
            "model": {
                "name": lm.name, "path": local_path(lm.name) if Path(lm.name).exists() else None,
                "hash": self.identity["model_hash"], "family": lm.family.name,
                "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device), "n_layers": lm.n_layers,
                "d_model": lm.d_model, "vocab_size": len(self._vocab),
            },
            "sae": {
                "path": local_path(self.sae_path) if self.sae_path else None, "hash": self.identity["sae_hash"],
                "architecture": sae.cfg.architecture, "hook": self.hook, "hook_in": sae.hook_in,
                "hook_out": sae.hook_out, "transcoder": sae.is_transcoder, "d_in": sae.cfg.d_in, "d_out": sae.d_out,
                "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k, "compute_dtype": str(self.run_sae.dtype).removeprefix("torch."),
                "hook_head_index": sae.cfg.hook_head_index, **encoder_rule(sae),
            },
            "head_attribution": state.heads.manifest() if state.heads is not None else state.heads_note,
            "corpus": {
                "path": local_path(self.corpus), "name": Path(self.corpus).name, "hash": corpus_hash(self.corpus),
                "n_contexts": state.n_contexts, "context_len": cfg.context_len, "n_tokens": state.n_tokens,
                "example_window": state.examples.window,
            },
            "settings": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "neighbors": facts[runfiles.NEIGHBORS_INFO],
            "metrics": metrics,
            "dark_matter": {**error_map.metrics, "err_norm_corr": norm_corr, "n_token_rows": len(token_rows["context_id"])},
            "dead_latents": dead.tolist(),
            "timings": {
                k: round(v, 4)
                for k, v in {**timings, **self.timings, "total_seconds": time.perf_counter() - self.started}.items()
            },
            "files": sizes,
        }

    # --- CE sample ---------------------------------------------------------------------------------------
    def _sample_losses(self, sample: ContextSample, slots: torch.Tensor, scored: torch.Tensor) -> dict | None:
        """Per-position losses of the sampled contexts in reservoir slots ``slots`` that are ``scored`` (a uniform
        subset of them, ``ContextSample.scored``; NaN rows for the rest), and their summary."""
        if not len(scored):
            return None
        live = {int(sample.context_id[s]) for s in scored}
        self._losses = {c: v for c, v in self._losses.items() if c in live}  # contexts evicted since: forgotten
        todo = [int(s) for s in scored if int(sample.context_id[s]) not in self._losses]
        # one context (three rows) per forward: the full-vocabulary logits are the run's memory peak, which must
        # not depend on how many contexts a run scores (~150 MB more per context at 49k vocabulary, fp32)
        for start in range(len(todo)):
            batch = torch.tensor(todo[start : start + 1])
            ids, mask = sample.token_ids[batch], sample.mask[batch]
            if self._resume:
                rows = per_token_ce_from_acts(self.lm, self.hook, ids, mask, sample.x[batch], sample.err[batch])
            else:
                rows = per_token_ce(self.lm, self.run_sae, ids, mask)
            for j, slot in enumerate(batch.tolist()):
                self._losses[int(sample.context_id[slot])] = {k: rows[k][j].float().cpu() for k in LOSS_KEYS}
        pos = sample.token_ids.shape[1]
        out = {k: torch.full((len(slots), pos - 1), float("nan")) for k in LOSS_KEYS}
        pred = torch.zeros(len(slots), pos - 1, dtype=torch.bool)
        chosen = set(scored.tolist())
        for i, slot in enumerate(slots.tolist()):
            cached = self._losses.get(int(sample.context_id[slot])) if slot in chosen else None
            if cached is not None:
                for k in LOSS_KEYS:
                    out[k][i] = cached[k]
                pred[i] = sample.mask[slot, :-1]
        count = int(pred.sum())
        if count == 0:
            return None
        return {**out, "metrics": summarize_ce(ce_totals(out, pred), count)}
