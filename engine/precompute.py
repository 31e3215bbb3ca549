"""``saescope precompute``: one streaming pass over a corpus into a run directory (docs/run-format.md).

Per batch of contexts: the model runs up to the SAE's hook and stops; the SAE encodes and decodes;
streaming accumulators on the device take the codes (``FeatureStats``, ``ExampleReservoirs``), the
reconstruction (``ReconStats``), the error's sufficient statistics (``LinearErrorStats``) and a
reservoir of held-out contexts (``ContextSample``). After the pass: CE losses on the sampled
contexts, the linear error map, logit effects, neighbours and labels; then the files, the DuckDB
index and, last, ``manifest.json``.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import rundir, runfiles, schema
from .accumulators import FeatureStats, sparse_codes
from .activations import iter_activations
from .corpus import corpus_files, corpus_hash, iter_contexts
from .darkmatter import LinearErrorStats
from .features import token_strings
from .interventions import check_sae_fits
from .metrics import ReconStats, per_token_ce, summarize_ce
from .models import LoadedModel
from .reservoirs import ExampleReservoirs
from .sampling import ContextSample, is_heldout
from .saes import SAE
from .store import build_index


@dataclass
class PrecomputeConfig:
    """Settings of one precompute run (recorded in the manifest)."""

    context_len: int = 128
    """Tokens per packed context."""
    tokens: int | None = None
    """Corpus tokens to process (whole contexts); None = the whole corpus."""
    batch_size: int = 16
    """Contexts per model forward."""
    include_special: bool = False
    """Count special tokens (BOS/EOS/PAD ...) in statistics and examples."""
    include_first: bool = False
    """Count position 0 (the attention sink) in statistics and examples."""
    include_massive: bool = False
    """Count massive-activation tokens (norm > 10x the batch median: sinks beyond position 0) in statistics."""
    top_k: int = 20
    """Top-activating contexts kept per latent."""
    quantile_bins: int = 10
    """Equal-width activation intervals on [0, max_act] for quantile examples."""
    per_bin: int = 5
    """Quantile examples per interval."""
    hist_bins: int = 64
    """Histogram bins on the power-of-two range above max_act (power of two)."""
    sample_contexts: int = 32
    """Held-out contexts sampled for per-token error rows and the CE-loss metrics."""
    n_logits: int = 10
    """Promoted and suppressed tokens kept per latent."""
    n_neighbors: int = 10
    """Nearest latents by decoder cosine."""
    ridge: float = 1e-6
    """Ridge of the linear error map, relative to the mean activation variance."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise ValueError(f"context length must be at least 2, got {self.context_len}")
        if self.tokens is not None and self.tokens < self.context_len:
            raise ValueError(f"--tokens ({self.tokens}) must be at least one context ({self.context_len} tokens)")
        for name in ("batch_size", "top_k", "quantile_bins", "per_bin"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_contexts < 0:
            raise ValueError(f"sample_contexts must be >= 0, got {self.sample_contexts}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ValueError(f"hist_bins must be a power of two >= 2, got {self.hist_bins}")


@dataclass
class _Pass:
    """Everything the streaming pass accumulates."""

    stats: FeatureStats
    examples: ExampleReservoirs
    recon: ReconStats
    dark: LinearErrorStats
    sample: ContextSample
    n_contexts: int = 0
    n_tokens: int = 0


def check_inputs(lm: LoadedModel, sae: SAE, corpus: str | Path, context_len: int) -> str:
    """Fail fast on a hook the model lacks, a width mismatch, a too-long context or a missing corpus."""
    hook = check_sae_fits(lm, sae)
    if context_len > lm.max_context:
        raise ValueError(f"context length {context_len} exceeds the model's maximum of {lm.max_context} positions")
    corpus_files(corpus)
    return hook


def compute_copy(sae: SAE, lm: LoadedModel) -> SAE:
    """The SAE as precompute runs it: on the model's device, and in the model's dtype when that is bf16, or
    fp16 off the CPU (16-bit matmuls are several times faster on GPUs and AMX CPUs, while fp16 is slow on
    CPUs); the SAE's own weights are left untouched."""
    fast = lm.dtype == torch.bfloat16 or (lm.dtype == torch.float16 and lm.device.type != "cpu")
    dtype = lm.dtype if fast else sae.dtype
    if sae.dtype == dtype and sae.device == lm.device:
        return sae
    return copy.deepcopy(sae).to(device=lm.device, dtype=dtype)


def precompute(
    lm: LoadedModel,
    sae: SAE,
    corpus: str | Path,
    out_dir: str | Path,
    *,
    tokens: int | None = None,
    context_len: int = 128,
    batch_size: int = 16,
    include_special: bool = False,
    include_first: bool = False,
    force: bool = False,
    progress: bool = True,
    sae_path: str | Path | None = None,
    **options,
) -> dict:
    """Compute a run directory for ``sae`` on ``corpus``; returns the manifest. See ``PrecomputeConfig``."""
    cfg = PrecomputeConfig(
        context_len=context_len, tokens=tokens, batch_size=batch_size, include_special=include_special,
        include_first=include_first, **options,
    )
    started = time.perf_counter()
    hook = check_inputs(lm, sae, corpus, cfg.context_len)
    contexts = iter_contexts(lm.tokenizer, corpus, cfg.context_len)
    first = next(contexts, None)
    if first is None:
        raise ValueError(f"corpus {corpus} is shorter than one context of {cfg.context_len} tokens")
    identity = {"model_hash": rundir.model_fingerprint(lm), "sae_hash": rundir.sae_fingerprint(sae)}
    staging = rundir.prepare(out_dir, **identity, force=force)
    try:
        return _run(lm, sae, compute_copy(sae, lm), hook, corpus, itertools.chain([first], contexts), cfg, staging, Path(out_dir),
                    identity, sae_path, progress, started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _run(lm, sae, run_sae, hook, corpus, contexts, cfg, staging, out_dir, identity, sae_path, progress, started) -> dict:
    timings: dict[str, float] = {}
    n_contexts = cfg.tokens // cfg.context_len if cfg.tokens else None
    if n_contexts is None and progress:  # one cheap tokenizing pass, so the bar can show an ETA
        print("precompute: counting the corpus' contexts (pass --tokens to skip this)...", file=sys.stderr, flush=True)
        n_contexts = sum(1 for _ in iter_contexts(lm.tokenizer, corpus, cfg.context_len))
    if cfg.tokens:
        contexts = itertools.islice(contexts, n_contexts)
    timings["setup_seconds"] = time.perf_counter() - started

    tick = time.perf_counter()
    state = _main_pass(lm, run_sae, hook, contexts, cfg, staging, n_contexts, progress)
    timings["main_pass_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    slots = state.sample.taken()
    losses = _sample_losses(lm, run_sae, state.sample, slots)
    timings["ce_sample_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    error_map = state.dark.fit(cfg.ridge)
    token_rows, norm_corr = runfiles.token_rows(state.sample, slots, error_map, losses)
    summary = state.stats.summary()
    vocab = token_strings(lm.tokenizer, max(lm.unembed_matrix().shape[0], len(lm.tokenizer)))
    labels, top_tokens = runfiles.write_examples(staging, state.examples, vocab)
    features = runfiles.feature_columns(lm, sae, cfg, summary, labels, top_tokens)
    timings["features_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    sizes = runfiles.write_files(staging, features, vocab, token_rows, error_map)
    build_index(staging)
    timings["write_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - started
    timings["tokens_per_second"] = state.n_tokens / max(timings["main_pass_seconds"], 1e-9)

    metrics = state.recon.summary()
    dead = np.nonzero(summary.fire_count == 0)[0]
    metrics.update(
        n_dead=int(len(dead)),
        dead_fraction=float(len(dead) / len(summary.fire_count)),
        dense_fraction=float((summary.density > 0.1).mean()),
    )
    ce_keys = ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div", "n_predictions")
    metrics.update(losses["metrics"].to_dict() if losses is not None else dict.fromkeys(ce_keys))  # null: no CE sample
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": lm.name, "hash": identity["model_hash"], "family": lm.family.name, "dtype": str(lm.dtype).removeprefix("torch."),
            "device": str(lm.device), "n_layers": lm.n_layers, "d_model": lm.d_model, "vocab_size": len(vocab),
        },
        "sae": {
            "path": str(sae_path) if sae_path else None, "hash": identity["sae_hash"], "architecture": sae.cfg.architecture,
            "hook": hook, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "compute_dtype": str(run_sae.dtype).removeprefix("torch."),
        },
        "corpus": {
            "path": str(corpus), "name": Path(corpus).name, "hash": corpus_hash(corpus), "n_contexts": state.n_contexts,
            "context_len": cfg.context_len, "n_tokens": state.n_tokens,
        },
        "settings": asdict(cfg),
        "metrics": metrics,
        "dark_matter": {**error_map.metrics, "err_norm_corr": norm_corr, "n_token_rows": len(token_rows["context_id"])},
        "dead_latents": dead.tolist(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "files": sizes,
    }
    rundir.finalize(out_dir, staging, manifest)
    return manifest


@torch.inference_mode()
def _main_pass(lm, sae, hook, contexts, cfg: PrecomputeConfig, staging: Path, n_contexts, progress) -> _Pass:
    dev, d_in, d_sae = sae.device, sae.cfg.d_in, sae.cfg.d_sae
    state = _Pass(
        stats=FeatureStats(d_sae, dev, n_bins=cfg.hist_bins),
        examples=ExampleReservoirs(d_sae, cfg.context_len, dev, top_k=cfg.top_k, n_bins=cfg.quantile_bins,
                                   per_bin=cfg.per_bin, internal_bins=2 * cfg.quantile_bins, seed=cfg.seed),
        recon=ReconStats(d_in, dev),
        dark=LinearErrorStats(d_in, dev),
        sample=ContextSample(cfg.sample_contexts, cfg.context_len, d_in, dev, seed=cfg.seed),
    )
    writer = rundir.ContextWriter(staging / schema.CONTEXTS)
    total = n_contexts * cfg.context_len if n_contexts else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="precompute")
    batches = iter_activations(lm, hook, contexts, cfg.batch_size, include_special=cfg.include_special,
                               include_first=cfg.include_first, include_massive=cfg.include_massive)
    for batch in batches:
        n_batch, n_pos = batch.token_ids.shape
        context_ids = torch.arange(state.n_contexts, state.n_contexts + n_batch)
        x = batch.acts.to(dev).reshape(n_batch * n_pos, -1)
        mask = batch.mask.to(dev)
        flat_mask = mask.reshape(-1)
        out = sae(x)
        codes = sparse_codes(out.codes, flat_mask)  # excluded tokens count nowhere: not in stats, not in examples
        n_included = int(flat_mask.sum())
        l0 = state.stats.update(codes, n_batch * n_pos, n_included)
        state.examples.update(codes, context_ids)
        x_in = x[flat_mask].float()
        state.recon.update(x_in, out.x_hat[flat_mask], n_active=len(codes.value))
        heldout = is_heldout(context_ids).to(dev)[:, None].expand(n_batch, n_pos).reshape(-1)[flat_mask]
        state.dark.update(x_in, out.error[flat_mask], heldout)
        state.sample.offer(context_ids, batch.token_ids, batch.mask, x.view(n_batch, n_pos, -1).float(),
                           out.error.view(n_batch, n_pos, -1), l0.view(n_batch, n_pos))
        writer.add(context_ids.numpy(), batch.token_ids.numpy())
        state.n_contexts += n_batch
        state.n_tokens += n_included
        bar.update(n_batch * n_pos)
    bar.close()
    writer.close()
    return state


def _sample_losses(lm, sae, sample: ContextSample, slots: torch.Tensor, batch: int = 2) -> dict | None:
    """Per-position CE losses (clean, with SAE, zero-ablated, KL) on the sampled contexts, and their summary.

    Few contexts per forward: three sets of full-vocabulary logits plus their float32 log-softmaxes would
    otherwise be the run's memory peak (about 1 GB more at 8 contexts of 128 tokens, 49k vocabulary).
    """
    if not len(slots):
        return None
    ids, mask = sample.token_ids[slots], sample.mask[slots]
    parts: dict[str, list[torch.Tensor]] = {"clean": [], "sae": [], "zero": [], "kl": []}
    for start in range(0, len(ids), batch):
        losses = per_token_ce(lm, sae, ids[start : start + batch], mask[start : start + batch])
        for key in parts:
            parts[key].append(losses[key].float().cpu())
    out = {key: torch.cat(value) for key, value in parts.items()}
    pred = mask[:, :-1]
    count = int(pred.sum())
    if count == 0:
        return None
    out["metrics"] = summarize_ce({k: float(out[k][pred].double().sum()) for k in parts}, count)
    return out
