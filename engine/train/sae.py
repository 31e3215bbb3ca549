"""Training an SAE on streamed activations (``saescope train-sae``): TopK, g-SAE, feature choice, mutual choice
or Matryoshka BatchTopK (``families``), resumable from periodic checkpoints (``checkpoint``).

Dead latents (not fired for ``--dead-tokens`` training tokens, default 1M; the TopK paper, Gao et al., uses 10M)
feed the AuxK loss, scaled by ``min(n_dead / (d_in // 2), 1)`` as in sparsify, and the report's ``dead_fraction``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import atomic, lock
from ..analysis.metrics import ReconStats, ce_metrics
from ..data.activations import iter_activations
from ..data.corpus import corpus_files, iter_contexts
from ..data.gradients import iter_gradients
from ..model.loading import LoadedModel
from ..saes import SAEConfig
from . import checkpoint


@dataclass
class TrainConfig:
    """Settings of one ``train-sae`` run."""

    hook_name: str
    """Hook point to train on, e.g. ``blocks.15.hook_resid_post``."""
    corpus: str
    """Training corpus (file or directory)."""
    width: int
    """Number of latents."""
    k: int
    """Latents kept per token."""
    tokens: int
    """Training tokens to stream (after excluding position 0 and special tokens)."""
    eval_corpus: str | None = None
    """Held-out corpus; when absent the first ``eval_contexts`` contexts of ``corpus`` are held out."""
    context_len: int = 256
    """Tokens per packed context."""
    model_batch: int = 16
    """Contexts per model forward."""
    batch_size: int = 4096
    """Tokens per SAE optimisation step."""
    buffer_tokens: int = 65536
    """Activations held in the shuffle buffer (bounds memory)."""
    reuse: int = 1
    """Passes over each buffer fill (1 = every token seen once)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(width / 2**14)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary loss that revives dead latents."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (Gao et al. use 10M)."""
    eval_contexts: int = 64
    """Held-out contexts for the report (reconstruction metrics)."""
    ce_contexts: int = 32
    """Held-out contexts for the CE-loss metrics (three full forwards each)."""
    seed: int = 0
    architecture: str = "topk"
    """SAE family: topk, gradient_topk (g-SAE), feature_choice, mutual_choice or matryoshka (BatchTopK with nested
    prefix losses, saved as JumpReLU)."""
    gradient_beta: float = 1.0
    """gradient_topk: weight of the gradient term in the selection score ``z + beta * z * |W_dec grad_x L|``."""
    matryoshka_widths: str = ""
    """matryoshka: comma-separated cumulative prefix widths, strictly increasing and ending at --width, e.g.
    288,1152,4608."""
    calibration_contexts: int = 128
    """Batch-rule families (feature/mutual choice, Matryoshka): training contexts sampled uniformly over the run on
    which the inference thresholds are calibrated with the final weights."""
    checkpoint_minutes: float = 10.0
    """Write a resumable checkpoint at the first buffer boundary after this many minutes (0: every buffer)."""

    def widths(self) -> list[int]:
        """The Matryoshka prefix widths as integers."""
        try:
            return [int(w) for w in self.matryoshka_widths.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--matryoshka-widths must be comma-separated integers, got {self.matryoshka_widths!r}") from None

    def __post_init__(self) -> None:
        from .families import TRAINERS

        if self.architecture not in TRAINERS:
            raise ValueError(f"unknown --architecture {self.architecture!r}; choose one of {', '.join(TRAINERS)}")
        if self.architecture == "matryoshka":
            widths = self.widths()
            if not widths:
                raise ValueError("--architecture matryoshka needs --matryoshka-widths (cumulative prefix widths ending at "
                                 f"--width {self.width}, e.g. {self.width // 16},{self.width // 4},{self.width})")
            SAEConfig(architecture="jumprelu", d_in=1, d_sae=self.width, matryoshka_widths=widths)  # the same checks
        elif self.matryoshka_widths:
            raise ValueError(f"--matryoshka-widths applies to --architecture matryoshka, not {self.architecture}")

        check_budget(self)


def check_budget(cfg) -> None:
    """The checks every training config shares (``TrainConfig``, ``TranscoderTrainConfig``): width, k, the token
    budget and the batch against the shuffle buffer."""
    if cfg.width <= 0:
        raise ValueError(f"--width must be positive, got {cfg.width}")
    if not 0 < cfg.k < cfg.width:
        raise ValueError(f"--k must satisfy 0 < k < width ({cfg.width}), got {cfg.k}")
    if cfg.tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {cfg.tokens}")
    if cfg.batch_size > cfg.buffer_tokens:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the buffer ({cfg.buffer_tokens} tokens)")


def _lr_scale(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * 0.8)
    if step >= decay_start and total > decay_start:
        return max(0.05, 1 - (step - decay_start) / (total - decay_start))
    return 1.0


def prepare_output(out: str | Path, force: bool) -> Path:
    """Refuse an output directory that already holds something unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        is_sae = (out / "cfg.json").is_file()
        if not is_sae:  # --force replaces an SAE (a retrained one), never a folder of something else
            raise FileExistsError(f"output directory {out} holds files that are not an SAE ({_sample(out)}); "
                                  "--force replaces only an earlier SAE: choose another --out")
        if not force:
            raise FileExistsError(f"output directory {out} already holds an SAE; pass --force to replace it")
    return out


def _sample(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _write_atomically(out: Path, sae, report: dict) -> None:
    with atomic.build_dir(out) as tmp:  # the old folder is replaced only once the new one is whole
        sae.save(tmp)
        (tmp / "training_report.json").write_text(json.dumps(report, indent=2))


@torch.inference_mode()
def evaluate(lm: LoadedModel, sae, hook: str, contexts: list[list[int]], ce_contexts: int, batch: int, *,
             with_gradient: bool = False, collect: dict[str, torch.Tensor] | None = None) -> dict:
    """Held-out reconstruction metrics, firing fractions and CE-loss metrics of ``sae``.

    Tokens count by precompute's rule (``iter_activations``' mask: no position 0, special or massive-activation
    token), so the CE metrics splice and score exactly where a run's would. The reconstruction metrics count the
    massive tokens too (``explained_variance`` = ``explained_variance_with_massive``), which can dominate the
    variance; ``explained_variance_without_massive`` leaves them out, as a run's statistics do by default. The
    massive-token rule's median is per batch of ``batch`` contexts: the same tokens as a precompute over
    ``contexts`` when ``batch`` is its ``batch_size`` (docs/run-format.md, "Which tokens count").

    ``with_gradient`` (a g-SAE): the reconstruction metrics encode each token with its loss gradient (one full
    forward and backward per batch, ``iter_gradients``) instead of the fallback rule; the CE metrics splice the SAE
    into a forward, where there is no gradient, so they use the fallback. ``collect``, when given, receives
    ``l0`` (each counted token's number of active latents, ``[n_tokens]``) and ``fires`` (each latent's firings).
    """
    stats, typical = ReconStats(sae.cfg.d_in), ReconStats(sae.cfg.d_in)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    masks: list[torch.Tensor] = []
    l0: list[torch.Tensor] = []
    batches = iter_gradients(lm, hook, contexts, batch) if with_gradient else iter_activations(lm, hook, contexts, batch)
    for ab in batches:
        assert ab.massive is not None  # iter_activations always flags them
        masks.append(ab.mask.cpu())
        counted = ab.mask | ab.massive
        x = ab.acts[counted].float().to(sae.device)
        out = sae(x, grad=ab.grads[counted].to(sae.device)) if with_gradient and ab.grads is not None else sae(x)
        stats.update(x, out.x_hat, out.codes)
        keep = ab.mask[counted].to(sae.device)
        typical.update(x[keep], out.x_hat[keep], out.codes[keep])
        fires += (out.codes > 0).sum(0).cpu()
        l0.append((out.codes != 0).sum(-1).cpu())
    summary: dict[str, float | None] = dict(stats.summary())
    summary["explained_variance_with_massive"] = summary["explained_variance"]
    summary["explained_variance_without_massive"] = typical.summary()["explained_variance"]
    summary["n_massive_tokens"] = stats.n - typical.n
    ids = torch.tensor(contexts[:ce_contexts], dtype=torch.long)
    summary.update(ce_metrics(lm, sae, ids, torch.cat(masks)[:ce_contexts]).to_dict(extended=True))
    density = fires.double() / max(stats.n, 1)
    # never fired on these few held-out tokens: overstates dead latents (``dead_fraction`` is over training tokens)
    summary["heldout_silent_fraction"] = float((fires == 0).double().mean())
    summary["dense_fraction"] = float((density > 0.1).double().mean())
    if collect is not None:
        collect["l0"], collect["fires"] = torch.cat(l0) if l0 else torch.zeros(0, dtype=torch.long), fires
    return summary


class _Counted:
    """An iterator of contexts that counts how many it has handed out (where a resumed run picks up) and keeps a
    uniform reservoir sample of ``keep`` of them (for calibrating inference thresholds), the same on a resumed run."""

    def __init__(self, contexts: Iterator[list[int]], *, start: int = 0, keep: int = 0, seed: int = 0,
                 sample: list[list[int]] | None = None):
        self.contexts, self.n, self.keep, self.seed = contexts, start, keep, seed
        self.sample: list[list[int]] = sample or []

    def __iter__(self) -> Iterator[list[int]]:
        for ctx in self.contexts:
            if len(self.sample) < self.keep:
                self.sample.append(ctx)
            elif self.keep:
                slot = random.Random(self.seed * 1_000_003 + self.n).randrange(self.n + 1)  # Algorithm R, seeded per index
                if slot < self.keep:
                    self.sample[slot] = ctx
            self.n += 1
            yield ctx


def _calibration_rows(lm: LoadedModel, cfg: TrainConfig, contexts: list[list[int]]) -> torch.Tensor:
    """The counted training activations of the reservoir's contexts, shuffled (seeded) across contexts."""
    rows = [ab.acts[ab.mask].float() for ab in iter_activations(lm, cfg.hook_name, contexts, cfg.model_batch)]
    if not rows:
        return torch.empty(0)
    x = torch.cat(rows)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed)).to(x.device)]


def _stream(lm: LoadedModel, cfg: TrainConfig, contexts: Iterable[list[int]], with_grad: bool
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Each model batch's counted tokens: ``{"x": acts}`` (float32), plus ``"grad"`` for a g-SAE."""
    if with_grad:
        for gb in iter_gradients(lm, cfg.hook_name, contexts, cfg.model_batch):
            assert gb.grads is not None  # iter_gradients always sets them
            yield {"x": gb.acts[gb.mask].float(), "grad": gb.grads[gb.mask]}
    else:
        for ab in iter_activations(lm, cfg.hook_name, contexts, cfg.model_batch):
            yield {"x": ab.acts[ab.mask].float()}


PER_SAE = ("architecture", "gradient_beta", "matryoshka_widths")
"""Settings that may differ between the SAEs of one training pass (``train_saes``); all others are shared."""


def _check_pass(cfgs: list[TrainConfig], outs: list[Path]) -> None:
    if not cfgs or len(cfgs) != len(outs):
        raise ValueError(f"one --out per --architecture: got {len(cfgs)} architectures and {len(outs)} outputs")
    resolved = [o.resolve() for o in outs]
    if len(set(resolved)) != len(resolved):
        raise ValueError("the --out folders of one training pass must differ")
    shared = {k: v for k, v in asdict(cfgs[0]).items() if k not in PER_SAE}
    for c in cfgs[1:]:
        differ = [k for k, v in asdict(c).items() if k not in PER_SAE and shared[k] != v]
        if differ:
            raise ValueError(f"the SAEs of one training pass share every setting but {', '.join(PER_SAE)}; "
                             f"{c.architecture} has {differ[0]}={getattr(c, differ[0])!r} (first: {shared[differ[0]]!r})")


def train_sae(lm: LoadedModel, cfg: TrainConfig, out: str | Path, *, force: bool = False, progress: bool = True,
              restart: bool = False, interrupt_after_checkpoints: int | None = None) -> dict:
    """Train an SAE of ``cfg.architecture`` at ``cfg.hook_name`` and write an SAELens directory plus
    ``training_report.json``. A checkpoint of an interrupted run with the same settings is resumed (``restart``
    discards it). ``interrupt_after_checkpoints`` raises KeyboardInterrupt once that many checkpoints are written
    (what a kill at that moment leaves: for tests of resuming)."""
    return train_saes(lm, [cfg], [out], force=force, progress=progress, restart=restart,
                      interrupt_after_checkpoints=interrupt_after_checkpoints)[0]


def train_saes(lm: LoadedModel, cfgs: list[TrainConfig], outs: Sequence[str | Path], *, force: bool = False,
               progress: bool = True, restart: bool = False, interrupt_after_checkpoints: int | None = None
               ) -> list[dict]:
    """Train several SAEs (``cfgs[i]`` into ``outs[i]``) in one pass over the activation stream: one model forward
    (and, when a g-SAE is among them, one backward) per model batch feeds every trainer. The configs may differ only
    in ``PER_SAE``; each SAE starts from its seed's initialisation, steps on the same shuffled batches and is
    calibrated on the same sample as when trained alone, so each equals the SAE that ``train_sae`` trains alone
    with its config. Each has its own checkpoint beside its output; an interrupted pass resumes from the last
    checkpoint every SAE of the pass reached (``checkpoint.load_pass``). Returns the reports, in order."""
    from .families import TRAINERS

    paths = [Path(o) for o in outs]
    _check_pass(cfgs, paths)
    with contextlib.ExitStack() as locks:
        for o in paths:
            locks.enter_context(lock.hold(o.parent, f"saescope train-sae --out {o}", name=f".{o.name}.saescope.lock"))
        paths = [prepare_output(o, force) for o in paths]
        cfg = cfgs[0]
        lm.hooks.check(cfg.hook_name)
        corpus_files(cfg.corpus)  # fails early on a missing or empty path
        d_in = lm.hook_width(cfg.hook_name)
        torch.manual_seed(cfg.seed)
        start = time.time()

        train_iter = iter_contexts(lm.tokenizer, cfg.corpus, cfg.context_len)
        if cfg.eval_corpus:
            eval_ctx = list(itertools.islice(iter_contexts(lm.tokenizer, cfg.eval_corpus, cfg.context_len), cfg.eval_contexts))
        else:
            eval_ctx = list(itertools.islice(train_iter, cfg.eval_contexts))
        if not eval_ctx:
            raise ValueError(f"the evaluation corpus yields no context of {cfg.context_len} tokens")

        trainers = [TRAINERS[c.architecture](d_in, c, lm.device) for c in cfgs]
        with_grad = any(t.needs_gradient for t in trainers)
        calibrated = any(t.calibrated for t in trainers)
        together = {"trained_in_one_pass_with": [c.architecture for c in cfgs]} if len(cfgs) > 1 else {}
        settings = [{**asdict(c), "model": lm.name, "d_in": d_in, **together} for c in cfgs]
        ckpts = [checkpoint.checkpoint_dir(o) for o in paths]
        if restart:
            checkpoint.discard(ckpts)
        seen, step, buffers_done, skip, resumed_from = 0, 0, 0, 0, None
        logs: list[list[dict]] = [[] for _ in cfgs]
        carry = {"x": torch.empty(0, d_in, device=lm.device)}
        if with_grad:
            carry["grad"] = torch.empty(0, d_in, device=lm.device)
        sample = None
        found = checkpoint.load_pass(ckpts, trainers, settings)
        if found is not None:
            carry, dones = found
            done = dones[0]
            seen, step, buffers_done, skip = done["seen"], done["step"], done["buffers"], done["contexts"]
            logs = [d["log"] for d in dones]
            sample, resumed_from = done.get("calibration_sample"), seen
        counted = _Counted(itertools.islice(train_iter, skip, None), start=skip, seed=cfg.seed,
                           keep=cfg.calibration_contexts if calibrated else 0, sample=sample)
        total_steps = max(1, cfg.tokens * cfg.reuse // cfg.batch_size)
        buffer = {n: torch.empty(cfg.buffer_tokens, d_in, dtype=torch.float32, device=lm.device) for n in carry}
        fill = 0
        bar = tqdm(total=cfg.tokens, initial=seen, unit="tok", unit_scale=True, disable=not progress, desc="train-sae")
        stream = _stream(lm, cfg, counted, with_grad)
        exhausted = False
        last_ckpt, n_ckpts = time.time(), 0
        while seen < cfg.tokens and not exhausted:
            while fill < cfg.buffer_tokens and seen < cfg.tokens:
                if not len(carry["x"]):
                    got = next(stream, None)
                    if got is None:
                        exhausted = True
                        break
                    carry = got
                take = min(len(carry["x"]), cfg.buffer_tokens - fill, cfg.tokens - seen)
                for n in buffer:
                    buffer[n][fill : fill + take] = carry[n][:take]
                carry = {n: t[take:] for n, t in carry.items()}
                fill, seen = fill + take, seen + take
                bar.update(take)
            if fill < cfg.batch_size:
                if step == 0:
                    raise ValueError(
                        f"the corpus gives only {fill} usable tokens, fewer than one batch of {cfg.batch_size}; "
                        "use a larger corpus or a smaller --batch-size"
                    )
                break
            if step == 0:
                for trainer in trainers:
                    trainer.init_b_dec(buffer["x"][:fill])
            # each buffer's shuffles come from its own seeded generator: a resumed run repeats them exactly
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + buffers_done)
            for _ in range(cfg.reuse):
                perm = torch.randperm(fill, generator=gen).to(lm.device)
                for i in range(0, fill - cfg.batch_size + 1, cfg.batch_size):
                    rows = perm[i : i + cfg.batch_size]
                    x = buffer["x"][rows]
                    grad = buffer["grad"][rows] if with_grad else None
                    scale = _lr_scale(step, total_steps)
                    metrics = [t.step(x, scale, grad if t.needs_gradient else None) for t in trainers]
                    step += 1
                    if step % 10 == 0 or step == 1:
                        m = metrics[0]
                        bar.set_postfix(
                            loss=f"{m['fvu']:.3f}", ev=f"{1 - m['fvu']:.3f}", l0=f"{m['l0']:.0f}", dead=f"{m['dead']:.1%}",
                        )
                        for log, m in zip(logs, metrics, strict=True):
                            log.append({"step": step, "tokens": seen, **m})
            fill = 0
            buffers_done += 1
            if seen < cfg.tokens and time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
                checkpoint.save_pass(ckpts, trainers, carry, [
                    {"settings": s, "seen": seen, "step": step, "buffers": buffers_done, "contexts": counted.n,
                     "log": log, "calibration_sample": counted.sample} for s, log in zip(settings, logs, strict=True)])
                last_ckpt, n_ckpts = time.time(), n_ckpts + 1
                if interrupt_after_checkpoints is not None and n_ckpts >= interrupt_after_checkpoints:
                    raise KeyboardInterrupt
        bar.close()
        train_seconds = time.time() - start
        if calibrated:  # inference thresholds from the final weights on a sample of the training contexts
            rows_cal = _calibration_rows(lm, cfg, counted.sample)
            for trainer in trainers:
                if trainer.calibrated:
                    trainer.calibrate(rows_cal)
        reports = []
        for c, trainer, s, log, out in zip(cfgs, trainers, settings, logs, paths, strict=True):
            sae = trainer.export(c.hook_name, lm.name, torch.float32)
            heldout = evaluate(lm, sae, c.hook_name, eval_ctx, c.ce_contexts, c.model_batch)
            window = min(c.dead_tokens, step * c.batch_size)
            heldout["dead_fraction"] = float((trainer.since_fired >= window).double().mean())
            report = {
                "settings": {**s, "device": str(lm.device), "model_dtype": str(lm.dtype)},
                "tokens_seen": seen,
                "steps": step,
                "resumed_at_tokens": resumed_from,
                "wall_time_seconds": round(time.time() - start, 1),
                "train_seconds": round(train_seconds, 1),
                "heldout": heldout,
                "log": log[-200:],
            }
            _write_atomically(out, sae, report)
            reports.append(report)
        checkpoint.discard(ckpts)
        return reports
