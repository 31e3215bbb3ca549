"""``saescope precompute``: one streaming pass over a corpus into a run directory (docs/run-format.md).

Per batch of contexts: the model runs up to the SAE's hook and stops; the SAE encodes and decodes;
streaming accumulators on the device take the codes (``FeatureStats``, ``ExampleReservoirs``), the
reconstruction (``ReconStats``), the error's sufficient statistics (``LinearErrorStats``) and a
reservoir of held-out contexts (``ContextSample``). For an ``attn.hook_z`` SAE the forward also captures the
layer's attention, and the top examples' head / source-token attribution rides in the reservoirs (``heads``).
Now and then, and at the end, ``RunWriter`` turns that state into a run: CE losses on the sampled contexts, the
linear error map, logit effects, neighbours and labels; then the files, the DuckDB index and, last,
``manifest.json`` (a snapshot while the pass goes on, the finished run at its end).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from .. import lock
from ..analysis.interventions import check_sae_fits, compute_copy
from ..analysis.metrics import ReconStats
from ..data.activations import iter_activations
from ..data.corpus import corpus_files, iter_contexts
from ..data.gradients import iter_gradients
from ..model.loading import LoadedModel
from ..run import parquet, rundir, schema
from ..saes import SAE
from ..saes.gradient_topk import GradientTopKSAE
from .accumulators import FeatureStats, SparseCodes, sparse_codes
from .darkmatter import LinearErrorStats, parse_positions
from .heads import HeadAttribution, attention_hook
from .reservoirs import ExampleReservoirs
from .runwriter import RunTarget, RunWriter
from .sampling import ContextSample, is_heldout


@dataclass(frozen=True)
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
    """Held-out contexts sampled for per-token error rows (and, at most, the CE-loss metrics)."""
    ce_every: int = 128
    """One sampled context per this many contexts of the run gets its next-token losses scored (clean, with
    the SAE, zero-ablated: the CE-loss metrics), at least one and at most ``sample_contexts``: scoring a
    context costs several forwards of it, so a fixed count would dominate short runs."""
    snapshot_tokens: int | None = 16384
    """Publish a browsable snapshot after this many tokens, then at doubling counts (None or 0: only the
    finished run)."""
    n_logits: int = 10
    """Promoted and suppressed tokens kept per latent."""
    logits_on_demand_above: int = 131_072
    """SAEs wider than this leave the logit effects out of features.parquet (null), so the run need not wait for
    d_sae products through the unembedding; the feature page computes a latent's when shown (one product) and
    caches it (0: always on demand)."""
    example_window: int | None = None
    """Tokens kept of each example context, around its maximum (default: whole contexts up to
    --neighbors-exact-max latents, 32 tokens above, where the reservoirs' d_sae x 120 x context_len float16
    activations would dominate memory; 0 or >= --context-len: whole contexts)."""
    n_neighbors: int = 10
    """Nearest latents by decoder cosine."""
    neighbors_exact_max: int = 65_536
    """Widest SAE whose decoder neighbours are found exactly; wider ones use an IVF index, its recall@n measured on a
    sample and kept in the manifest (``neighbors``)."""
    neighbors_probe: int = 32
    """IVF lists each list of latents searches, where the neighbours are approximate (more: slower, higher recall)."""
    neighbors_on_demand_above: int = 131_072
    """SAEs wider than this leave the decoder neighbours out of features.parquet (null): the feature page finds a
    latent's exactly when shown (one product of its direction with the decoder: milliseconds at 1M latents) and
    caches it, so the run need not wait for an index over every latent (0: always on demand)."""
    ridge: float = 1e-6
    """Ridge of the linear error map, relative to the mean activation variance."""
    dfa_sources: int = 16
    """``attn.hook_z`` SAEs: (head, source token) contributions kept per top example (0: no head attribution)."""
    paper_positions: str | None = None
    """Positions FIRST:LAST (inclusive) the paper-style dark-matter fit (``paper_*``) uses; none: every counted
    position. The paper's setting: 1:1022 with --context-len 1024 (200:1022 for its ||e||^2 headline)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise ValueError(f"context length must be at least 2, got {self.context_len}")
        positions = parse_positions(self.paper_positions)
        if positions is not None and positions[1] >= self.context_len:
            raise ValueError(f"paper positions {self.paper_positions} reach past the last position of a "
                             f"{self.context_len}-token context: raise --context-len (the paper's setting is "
                             "--context-len 1024 --paper-positions 1:1022) or lower LAST")
        if self.tokens is not None and self.tokens < self.context_len:
            raise ValueError(f"--tokens ({self.tokens}) must be at least one context ({self.context_len} tokens)")
        if self.example_window is not None and self.example_window < 0:
            raise ValueError(f"--example-window must be >= 0 (0: whole contexts), got {self.example_window}")
        if self.dfa_sources < 0:
            raise ValueError(f"dfa_sources must be >= 0 (0: no head attribution), got {self.dfa_sources}")
        for name in ("batch_size", "top_k", "quantile_bins", "per_bin", "ce_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.snapshot_tokens is not None and self.snapshot_tokens < 0:
            raise ValueError(f"snapshot_tokens must be >= 0 (0: no snapshots), got {self.snapshot_tokens}")
        if self.sample_contexts < 0:
            raise ValueError(f"sample_contexts must be >= 0, got {self.sample_contexts}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ValueError(f"hist_bins must be a power of two >= 2, got {self.hist_bins}")


@dataclass
class PassState:
    """Everything the streaming pass accumulates."""

    stats: FeatureStats
    examples: ExampleReservoirs
    recon: ReconStats
    dark: LinearErrorStats
    sample: ContextSample
    recon_massive: ReconStats | None = None
    """Reconstruction sums over the massive-activation tokens (whether or not the statistics count them), for the
    explained variance with and without them (None: not accumulated, e.g. a state saved before it existed)."""
    heads: HeadAttribution | None = None
    """Head attribution of an ``attn.hook_z`` SAE (None for other hooks, or when it does not apply)."""
    heads_note: dict | None = None
    """For an ``attn.hook_z`` SAE without head attribution: why (the manifest's ``head_attribution``)."""
    n_contexts: int = 0
    n_tokens: int = 0


def check_inputs(lm: LoadedModel, sae: SAE, corpus: str | Path, context_len: int) -> str:
    """Fail fast on a hook the model lacks, a width mismatch, a too-long context or a missing corpus."""
    hook = check_sae_fits(lm, sae)
    if sae.is_transcoder and sae.d_out != sae.cfg.d_in:
        raise ValueError(f"precompute of a transcoder needs d_out == d_in (its error map and context sample are "
                         f"d_in wide); this one maps {sae.cfg.d_in} to {sae.d_out}")
    if sae.is_transcoder and sae.needs_loss_gradient:
        raise ValueError("a transcoder that selects with the loss gradient is not supported")
    for name, tensor in sae.named_parameters():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the SAE's {name} holds NaN or infinite values: it cannot be run (a corrupt file, or "
                             "training diverged)")
    if context_len > lm.max_context:
        raise ValueError(f"context length {context_len} exceeds the model's maximum of {lm.max_context} positions")
    corpus_files(corpus)
    return hook


def precompute(
    lm: LoadedModel,
    sae: SAE,
    corpus: str | Path,
    out_dir: str | Path,
    cfg: PrecomputeConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    sae_path: str | Path | None = None,
    **settings,
) -> dict:
    """Compute a run directory for ``sae`` on ``corpus`` with the settings ``cfg`` (passed whole; ``settings``
    replace some of its fields, e.g. ``context_len=64``); returns the manifest."""
    cfg = dataclasses.replace(cfg or PrecomputeConfig(), **settings)
    started = time.perf_counter()
    hook = check_inputs(lm, sae, corpus, cfg.context_len)  # before anything is created: bad inputs leave nothing
    contexts = iter_contexts(lm.tokenizer, corpus, cfg.context_len)
    first = next(contexts, None)
    if first is None:
        raise ValueError(f"corpus {corpus} is shorter than one context of {cfg.context_len} tokens")
    identity = {"model_hash": rundir.model_fingerprint(lm), "sae_hash": rundir.sae_fingerprint(sae)}
    with lock.hold(out_dir, "saescope precompute"):
        staging = rundir.prepare(out_dir, **identity, force=force)
        try:
            run = RunTarget(lm, sae, compute_copy(sae, lm), hook, corpus, cfg, staging, Path(out_dir), identity, sae_path,
                            None, started)
            return _run(run, itertools.chain([first], contexts), progress)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _run(run: RunTarget, contexts, progress: bool) -> dict:
    lm, sae, hook, cfg = run.lm, run.sae, run.hook, run.cfg
    timings: dict[str, float] = {}
    n_contexts = cfg.tokens // cfg.context_len if cfg.tokens else None
    if n_contexts is None and progress:  # one cheap tokenizing pass, so the bar can show an ETA
        print("precompute: counting the corpus' contexts (pass --tokens to skip this)...", file=sys.stderr, flush=True)
        n_contexts = sum(1 for _ in iter_contexts(lm.tokenizer, run.corpus, cfg.context_len))
    if cfg.tokens:
        contexts = itertools.islice(contexts, n_contexts)
    timings["setup_seconds"] = time.perf_counter() - run.started
    run = dataclasses.replace(run, target_tokens=n_contexts * cfg.context_len if n_contexts else None)
    writer = RunWriter(run)

    heads, note = head_attribution(lm, sae, hook, cfg)
    tick = time.perf_counter()
    state, context_file = _main_pass(lm, run.run_sae, hook, contexts, cfg, run.staging, n_contexts, progress, writer,
                                     timings, heads, note)
    timings["main_pass_seconds"] = time.perf_counter() - tick - writer.timings["snapshot_seconds"]
    if heads is not None:
        timings["head_attribution_seconds"] = heads.seconds
    timings["tokens_per_second"] = state.n_tokens / max(timings["main_pass_seconds"], 1e-9)
    timings["snapshots"] = writer.snapshots
    timings["snapshots_failed"] = len(writer.failed_snapshots)
    return writer.final(state, context_file, timings)


def head_attribution(lm, sae: SAE, hook: str, cfg: PrecomputeConfig) -> tuple[HeadAttribution | None, dict | None]:
    """The pass's head attribution (``attn.hook_z`` SAEs), or None and, for an attention hook without it, the
    manifest's note saying why."""
    heads, why_not = HeadAttribution.setup(lm, sae, cfg.dfa_sources)
    note = None
    if heads is None and attention_hook(hook) is not None:
        note = {"layer": attention_hook(hook), "n_heads": lm.n_heads, "dfa": False, "reason": why_not}
    return heads, note


WIDE_RUN_WINDOW = 32
"""Example window of wide runs (``example_window`` None above ``neighbors_exact_max`` latents)."""


def example_window(cfg: PrecomputeConfig, d_sae: int) -> int:
    """Tokens kept per example for an SAE of ``d_sae`` latents (the whole SAE's width, so every shard agrees)."""
    if cfg.example_window is None:
        return WIDE_RUN_WINDOW if d_sae > cfg.neighbors_exact_max and cfg.context_len > WIDE_RUN_WINDOW else cfg.context_len
    return cfg.context_len if cfg.example_window == 0 else min(cfg.example_window, cfg.context_len)


def new_state(sae: SAE, cfg: PrecomputeConfig, heads: HeadAttribution | None = None, heads_note: dict | None = None, *,
              latents: range | None = None, seed: int | None = None) -> PassState:
    """Empty accumulators for a pass of ``sae`` (on its device), over all latents or the slice ``latents``.

    ``seed`` (default ``cfg.seed``) seeds the random draws (quantile keys, the context sample): a shard of a
    sharded run passes its own (``shards.shard_seed``)."""
    dev, d_in = sae.device, sae.cfg.d_in
    d_sae = len(latents) if latents is not None else sae.cfg.d_sae
    seed = cfg.seed if seed is None else seed
    return PassState(
        stats=FeatureStats(d_sae, dev, n_bins=cfg.hist_bins),
        examples=ExampleReservoirs(d_sae, cfg.context_len, dev, top_k=cfg.top_k, n_bins=cfg.quantile_bins,
                                   per_bin=cfg.per_bin, internal_bins=2 * cfg.quantile_bins, seed=seed,
                                   payload=heads.payload_spec() if heads is not None else None,
                                   window=example_window(cfg, sae.cfg.d_sae)),
        recon=ReconStats(d_in, dev),
        dark=LinearErrorStats(d_in, dev, parse_positions(cfg.paper_positions)),
        sample=ContextSample(cfg.sample_contexts, cfg.context_len, d_in, dev, seed=seed),
        recon_massive=ReconStats(d_in, dev),
        heads=heads,
        heads_note=heads_note,
    )


CODE_BUDGET = 2**26
"""Dense code elements per SAE forward: a batch of a wide SAE is encoded in chunks of tokens, so its dense codes
(and the encoder's pre-activations) take a few hundred MB whatever the width (at 1M latents, 64 tokens a chunk)."""


def encode(sae: SAE, x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None = None,
           target: torch.Tensor | None = None) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
    """The positive codes of ``x [n, d_in]`` at tokens ``mask [n]`` (``sparse_codes``), the reconstruction and the
    error against ``target`` (default ``x``; a transcoder's output hook); in chunks of ``CODE_BUDGET // d_sae``
    tokens. ``grad [n, d_in]``: the loss gradient a g-SAE selects with."""
    rows = max(1, CODE_BUDGET // sae.cfg.d_sae)

    def run(lo: int, hi: int):
        aim = None if target is None else target[lo:hi]
        return sae(x[lo:hi], aim) if grad is None else sae(x[lo:hi], aim, grad=grad[lo:hi])

    if len(x) <= rows:
        out = run(0, len(x))
        return sparse_codes(out.codes, mask), out.x_hat, out.error
    codes, x_hat, error = [], [], []
    for lo in range(0, len(x), rows):
        out = run(lo, lo + rows)
        part = sparse_codes(out.codes, mask[lo : lo + rows])
        codes.append(part._replace(token=part.token + lo))
        x_hat.append(out.x_hat)
        error.append(out.error)
    joined = SparseCodes(*(torch.cat(parts) for parts in zip(*codes, strict=True)))
    return joined, torch.cat(x_hat), torch.cat(error)


def gradient_only_latents(sae: SAE, x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A g-SAE's firings at tokens ``mask [n]`` that the gradient alone admitted (firing under the g-SAE rule, not
    under plain TopK over ``z``): their latent ids, one entry per (token, latent); in chunks as ``encode``."""
    rows = max(1, CODE_BUDGET // sae.cfg.d_sae)
    found = []
    for lo in range(0, len(x), rows):
        admitted = cast(GradientTopKSAE, sae).admitted_by_gradient(x[lo : lo + rows], grad[lo : lo + rows])
        found.append(torch.nonzero(admitted[mask[lo : lo + rows]])[:, 1])
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=x.device)


def check_finite(x: torch.Tensor, context_ids: torch.Tensor) -> None:
    """Stop at the first batch whose activations hold NaN or infinity (a broken model or dtype overflow), counted
    tokens or not: the massive-activation rule would otherwise drop them silently (an infinite norm is "massive"),
    and counted ones would encode to garbage or to all-zero codes and make every latent look dead."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        n_pos = x.shape[0] // len(context_ids)
        first = int(rows[0])
        raise ValueError(f"the model's activations hold NaN or infinite values at {len(rows)} token(s) of the "
                         f"batch of contexts {int(context_ids[0])}-{int(context_ids[-1])}, first at context "
                         f"{int(context_ids[first // n_pos])} position {first % n_pos}: the model overflows in this "
                         "dtype (try --dtype float32) or its weights are broken; the run was not written")


def step(state: PassState, sae: SAE, batch, first_context: int, context_file: parquet.ContextWriter | None, *,
         latents: range | None = None) -> int:
    """Add one batch of activations (contexts numbered from ``first_context``) to ``state``; returns its tokens.

    With ``latents`` (a slice of a sharded run) only those latents' statistics and examples are kept, and the
    token-level state (reconstruction, dark matter, context sample, contexts file) only by the slice starting at
    latent 0, so that merging the slices counts every token once."""
    dev = sae.device
    n_batch, n_pos = batch.token_ids.shape
    context_ids = torch.arange(first_context, first_context + n_batch)
    x = batch.acts.to(dev).reshape(n_batch * n_pos, -1)
    mask = batch.mask.to(dev)
    flat_mask = mask.reshape(-1)
    check_finite(x, context_ids)
    grad = batch.grads.to(dev).reshape(n_batch * n_pos, -1) if getattr(batch, "grads", None) is not None else None
    # what it reconstructs: x itself, or a transcoder's output hook
    targets = getattr(batch, "targets", None)
    y = targets.to(dev).reshape(n_batch * n_pos, -1) if targets is not None else None
    codes, x_hat, error = encode(sae, x, flat_mask, grad, y)  # excluded tokens count nowhere: not in stats, not in examples
    n_included, n_active = int(flat_mask.sum()), len(codes.value)
    primary = latents is None or latents.start == 0
    if latents is not None:
        l0 = torch.bincount(codes.token, minlength=n_batch * n_pos) if primary else None
        keep = (codes.latent >= latents.start) & (codes.latent < latents.stop)
        codes = SparseCodes(codes.token[keep], codes.latent[keep] - latents.start, codes.value[keep])
        state.stats.update(codes, n_batch * n_pos, n_included)
    else:
        l0 = state.stats.update(codes, n_batch * n_pos, n_included)
    if grad is not None and sae.needs_loss_gradient:  # a g-SAE: which firings the gradient alone admitted
        only = gradient_only_latents(sae, x, flat_mask, grad)
        if latents is not None:
            only = only[(only >= latents.start) & (only < latents.stop)] - latents.start
        state.stats.add_gradient_only(only)
    heads = state.heads
    if heads is not None and batch.attention is not None:
        # the top examples' attribution, while this batch's attention is in memory (no second pass)
        found = state.examples.top_candidates(codes, n_batch)
        if latents is not None:  # the SAE's own latent ids
            found = found._replace(latent=found.latent + latents.start)
        state.examples.update(codes, context_ids, heads.payload(batch.attention, found))
    else:
        state.examples.update(codes, context_ids)
    if primary:
        assert l0 is not None
        x_in = x[flat_mask].float()
        aim = x if y is None else y
        state.recon.update(aim[flat_mask].float(), x_hat[flat_mask], n_active=n_active)
        if state.recon_massive is not None and batch.massive is not None and batch.massive.any():
            massive = batch.massive.to(dev).reshape(-1)
            # a few tokens per batch: encoded on their own (the pass keeps no dense codes)
            alone = sae(x[massive]) if grad is None else sae(x[massive], grad=grad[massive])
            state.recon_massive.update(aim[massive].float(), alone.x_hat, alone.codes)
        token_context = context_ids[:, None].expand(n_batch, n_pos).reshape(-1).to(dev)[flat_mask]
        token_position = torch.arange(n_pos, device=dev).repeat(n_batch)[flat_mask]
        state.dark.update(x_in, error[flat_mask], is_heldout(token_context), token_context, token_position)
        state.sample.offer(context_ids, batch.token_ids, batch.mask, x.view(n_batch, n_pos, -1).float(),
                           error.view(n_batch, n_pos, -1), l0.view(n_batch, n_pos))
        if context_file is not None:
            context_file.add(context_ids.numpy(), batch.token_ids.numpy())
    state.n_contexts += n_batch
    state.n_tokens += n_included
    return n_batch * n_pos


def activation_batches(lm, sae: SAE, hook: str, contexts, cfg: PrecomputeConfig, heads: HeadAttribution | None):
    """The pass's batches of activations (``iter_activations`` with the run's token rules); for a g-SAE with the
    loss gradient at the hook (``iter_gradients``: one full forward and one backward per batch, teacher-forced)."""
    if sae.needs_loss_gradient:
        if heads is not None or sae.cfg.hook_head_index is not None:
            raise ValueError("a g-SAE on a per-head hook (head attribution, hook_head_index) is not supported")
        return iter_gradients(lm, hook, contexts, cfg.batch_size, include_special=cfg.include_special,
                              include_first=cfg.include_first, include_massive=cfg.include_massive)
    return iter_activations(lm, hook, contexts, cfg.batch_size, include_special=cfg.include_special,
                            include_first=cfg.include_first, include_massive=cfg.include_massive,
                            head_index=sae.cfg.hook_head_index, attention=heads is not None,
                            target_hook=sae.hook_out if sae.is_transcoder else None)


@torch.inference_mode()
def _main_pass(lm, sae, hook, contexts, cfg: PrecomputeConfig, staging: Path, n_contexts, progress, writer: RunWriter, timings,
               heads: HeadAttribution | None, heads_note: dict | None):
    state = new_state(sae, cfg, heads, heads_note)
    context_file = parquet.ContextWriter(staging / schema.CONTEXTS)
    total = n_contexts * cfg.context_len if n_contexts else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="precompute")
    for batch in activation_batches(lm, sae, hook, contexts, cfg, heads):
        bar.update(step(state, sae, batch, state.n_contexts, context_file))
        # at a merge boundary of the reservoirs, so that taking a snapshot does not change what follows
        if state.examples.pending_contexts == 0 and writer.snapshot_due(state.n_contexts * cfg.context_len):
            writer.snapshot(state, context_file, timings)
            bar.set_postfix_str(f"snapshot {writer.snapshots} published", refresh=False)
    bar.close()
    return state, context_file
