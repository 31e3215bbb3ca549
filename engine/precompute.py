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
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import rundir, schema
from .accumulators import FeatureStats, sparse_codes
from .activations import iter_activations
from .corpus import corpus_files, corpus_hash, iter_contexts
from .darkmatter import LinearErrorMap, LinearErrorStats
from .features import decoder_neighbors, labels_from_examples, logit_effects, token_strings
from .interventions import check_sae_fits
from .metrics import ReconStats, per_token_ce, summarize_ce
from .models import LoadedModel
from .reservoirs import ExampleReservoirs, ExampleRows
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
    """The SAE as precompute runs it: on the model's device, and in the model's dtype when that is 16-bit
    (bf16 matmuls are several times faster on GPUs and AMX CPUs; the SAE's own weights are left untouched)."""
    dtype = lm.dtype if lm.dtype in (torch.bfloat16, torch.float16) else sae.dtype
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
    token_rows, norm_corr = _token_rows(state.sample, slots, error_map, losses)
    summary = state.stats.summary()
    vocab = token_strings(lm.tokenizer, max(lm.unembed_matrix().shape[0], len(lm.tokenizer)))
    labels, top_tokens = _write_examples(staging, state.examples, vocab)
    features = _feature_columns(lm, sae, cfg, summary, labels, top_tokens)
    timings["features_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    sizes = _write(staging, features, vocab, token_rows, error_map)
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
    if losses is not None:
        metrics.update(losses["metrics"].to_dict())
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
                               include_first=cfg.include_first)
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
        state.examples.update(out.codes.view(n_batch, n_pos, d_sae), mask, codes, context_ids)
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


def _sample_losses(lm, sae, sample: ContextSample, slots: torch.Tensor, batch: int = 8) -> dict | None:
    """Per-position CE losses (clean, with SAE, zero-ablated, KL) on the sampled contexts, and their summary."""
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


def _token_rows(sample: ContextSample, slots: torch.Tensor, error_map: LinearErrorMap, losses) -> tuple[dict, float]:
    """tokens.parquet columns for the sampled contexts, and corr(||linear part||, ||error||) over them."""
    n, pos = len(slots), sample.token_ids.shape[1]
    x = sample.x[slots].reshape(n * pos, -1)
    e = sample.err[slots].reshape(n * pos, -1)
    linear, nonlinear = error_map.split(x, e)
    mask = sample.mask[slots].reshape(-1).numpy()
    err_norm = e.norm(dim=-1)
    lin_norm = linear.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(x, x - e, dim=-1)
    cols = {
        "context_id": sample.context_id[slots][:, None].expand(n, pos).reshape(-1).numpy(),
        "position": np.tile(np.arange(pos), n),
        "token_id": sample.token_ids[slots].reshape(-1).numpy(),
        "l0": sample.l0[slots].reshape(-1).cpu().numpy(),
        "x_norm": x.norm(dim=-1).cpu().numpy(),
        "err_norm": err_norm.cpu().numpy(),
        "cos": cos.cpu().numpy(),
        "err_linear_norm": lin_norm.cpu().numpy(),
        "err_nonlinear_norm": nonlinear.norm(dim=-1).cpu().numpy(),
    }
    for key, name in (("clean", "ce_clean"), ("sae", "ce_sae")):
        values = np.full((n, pos), np.nan, dtype=np.float32)
        if losses is not None:
            values[:, :-1] = losses[key].numpy()
        cols[name] = values.reshape(-1)
    cols["ce_delta"] = cols["ce_sae"] - cols["ce_clean"]
    cols = {k: v[mask] for k, v in cols.items()}
    corr = float("nan")
    if mask.sum() > 2:
        a, b = cols["err_linear_norm"].astype(np.float64), cols["err_norm"].astype(np.float64)
        if a.std() > 0 and b.std() > 0:
            corr = float(np.corrcoef(a, b)[0, 1])
    return cols, corr


def _write_examples(staging: Path, reservoirs: ExampleReservoirs, vocab: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """Write examples.parquet a chunk of latents at a time; returns each latent's label and top tokens."""
    ctx_ids, ctx_tokens = rundir.read_context_tokens(staging / schema.CONTEXTS, reservoirs.context_ids())
    labels: list[str] = []
    tops: list[np.ndarray] = []
    with pq.ParquetWriter(staging / schema.EXAMPLES, schema.EXAMPLES_SCHEMA, compression="zstd") as writer:
        for latents, rows in reservoirs.iter_rows():
            if len(rows.context_id):
                tokens = ctx_tokens[np.searchsorted(ctx_ids, rows.context_id)]
            else:
                tokens = np.zeros(rows.acts.shape, np.int32)
            chunk_labels, chunk_tops = labels_from_examples(latents, rows.feature_id, rows.acts, tokens, vocab)
            labels += chunk_labels
            tops += [t[t >= 0] for t in chunk_tops]
            writer.write_table(rundir.table(_example_columns(rows), schema.EXAMPLES_SCHEMA), row_group_size=8192)
    return labels, tops


def _feature_columns(lm, sae, cfg, summary, labels: list[str], top_tokens: list[np.ndarray]) -> dict:
    """features.parquet columns (everything but the per-pass statistics and labels is computed here)."""
    d_sae = sae.cfg.d_sae
    if sae.cfg.d_in == lm.d_model:
        effects = logit_effects(lm, sae, cfg.n_logits)
        logits = [effects.top_ids, effects.top_values, effects.bottom_ids, effects.bottom_values]
    else:  # e.g. attn.hook_z: the decoder writes into head space, not the residual stream
        logits = [np.zeros((d_sae, 0), np.int32), np.zeros((d_sae, 0), np.float32)] * 2
    neighbor_ids, neighbor_cos = decoder_neighbors(sae, cfg.n_neighbors)
    return {
        "feature_id": np.arange(d_sae, dtype=np.int32),
        "fire_count": summary.fire_count,
        "density": summary.density,
        "max_act": summary.max_act,
        "mean_act": summary.mean_act,
        "dead": summary.fire_count == 0,
        "hist_counts": rundir.ragged_list_array(summary.hist_counts, pa.int64()),
        "hist_edges": rundir.ragged_list_array(summary.hist_edges, pa.float32()),
        "top_logit_ids": rundir.list_array(logits[0], pa_type=pa.int32()),
        "top_logit_values": rundir.list_array(logits[1]),
        "bottom_logit_ids": rundir.list_array(logits[2], pa_type=pa.int32()),
        "bottom_logit_values": rundir.list_array(logits[3]),
        "neighbor_ids": rundir.list_array(neighbor_ids, pa_type=pa.int32()),
        "neighbor_cos": rundir.list_array(neighbor_cos),
        "top_token_ids": rundir.ragged_list_array(top_tokens, pa.int32()),
        "label": labels,
        "explanation": [None] * d_sae,
    }


def _write(staging: Path, features: dict, vocab: list[str], token_rows: dict, error_map: LinearErrorMap) -> dict:
    """Write the remaining Parquet files and the error map; returns ``{file: {rows, bytes}}`` for all files."""
    rundir.write_table(staging / schema.FEATURES, features, schema.FEATURES_SCHEMA, row_group_size=16384)
    rundir.write_table(staging / schema.VOCAB, {"token_id": np.arange(len(vocab), dtype=np.int32), "token": vocab}, schema.VOCAB_SCHEMA)
    rundir.write_table(staging / schema.TOKENS, {k: _nullable(v) for k, v in token_rows.items()}, schema.TOKENS_SCHEMA)
    save_file(
        {"W": error_map.W.cpu(), "b": error_map.b.cpu(), "w_norm": error_map.w_norm.cpu(), "b_norm": torch.tensor([error_map.b_norm])},
        str(staging / schema.DARK_MATTER),
    )
    names = (schema.FEATURES, schema.EXAMPLES, schema.CONTEXTS, schema.VOCAB, schema.TOKENS)
    return {name: {"rows": pq.ParquetFile(staging / name).metadata.num_rows, "bytes": (staging / name).stat().st_size} for name in names}


def _example_columns(rows: ExampleRows) -> dict:
    n = len(rows.feature_id)
    return {
        "feature_id": rows.feature_id,
        "kind": np.where(rows.kind == 0, "top", "quantile").tolist(),
        "rank": rows.rank,
        "quantile_bin": pa.array(rows.quantile_bin, mask=rows.quantile_bin < 0),
        "context_id": rows.context_id,
        "max_pos": rows.max_pos,
        "max_act": rows.max_act,
        "start": np.zeros(n, np.int16),
        "acts": rundir.list_array(rows.acts.astype(np.float32)),
    }


def _nullable(values: np.ndarray):
    if values.dtype.kind == "f":
        return pa.array(values, mask=np.isnan(values))
    return values
