"""Training a TopK SAE on streamed activations (``saescope train-sae``).

Dead latents (not fired for ``--dead-tokens`` training tokens, default 1M; the TopK paper, Gao et al., uses 10M)
feed the AuxK loss, scaled by ``min(n_dead / (d_in // 2), 1)`` as in sparsify, and the report's ``dead_fraction``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import atomic, lock
from ..analysis.metrics import ReconStats, ce_metrics
from ..data.activations import iter_activations
from ..data.corpus import corpus_files, iter_contexts
from ..model.loading import LoadedModel
from ..model.machine import choose_dtype
from ..saes import SAEConfig, build_sae


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

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"--width must be positive, got {self.width}")
        if not 0 < self.k < self.width:
            raise ValueError(f"--k must satisfy 0 < k < width ({self.width}), got {self.k}")
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.batch_size > self.buffer_tokens:
            raise ValueError(f"batch size {self.batch_size} exceeds the buffer ({self.buffer_tokens} tokens)")


class TopKTrainer(torch.nn.Module):
    """fp32 master weights of a TopK SAE plus the optimiser and dead-latent bookkeeping."""

    def __init__(self, d_in: int, cfg: TrainConfig, device: torch.device):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.width, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec.to(device))
        self.W_enc = torch.nn.Parameter(W_dec.T.clone().to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.width, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        lr = cfg.lr or 2e-4 / math.sqrt(cfg.width / 2**14)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))
        self.base_lr = lr
        self.since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)
        # bf16 autocast where bf16 is fast: CUDA, and CPUs where the machine's micro-benchmark says so
        self.autocast = device.type == "cuda" or (device.type == "cpu" and choose_dtype(device, d_in).dtype == "bfloat16")

    def init_b_dec(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(x.mean(0))

    def step(self, x: torch.Tensor, lr_scale: float) -> dict[str, float]:
        """One optimisation step on ``x [batch, d_in]`` (float32)."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter(-1, idx, values.relu())
            x_hat = codes @ self.W_dec + self.b_dec
        err = x - x_hat.float()
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        dead = self.since_fired > self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead and self.cfg.aux_coef > 0:
            # AuxK as in sparsify / Gao et al.: up to d_in / 2 dead latents model the residual, and the loss is
            # scaled down while fewer latents than that are dead
            k_aux_max = x.shape[-1] // 2
            k_aux = min(k_aux_max, n_dead)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                dead_pre = pre.masked_fill(~dead, -torch.inf)
                aux_vals, aux_idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
                aux_codes = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals.relu())
                e_hat = aux_codes @ self.W_dec
            e = err.detach()
            aux = (e_hat.float() - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
            loss = loss + self.cfg.aux_coef * min(n_dead / k_aux_max, 1.0) * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # keep gradients from changing decoder norms (rows are renormalised after the step anyway)
            W, g = self.W_dec, self.W_dec.grad
            assert g is not None  # W_dec is in the loss's graph
            g -= (g * W).sum(-1, keepdim=True) * W
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * lr_scale
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            fired = (codes > 0).any(0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            l0 = float((codes > 0).sum(-1).float().mean())
        return {"fvu": float(fvu.detach()), "l0": l0, "dead": n_dead / self.cfg.width}

    def export(self, hook_name: str, model_name: str, dtype: torch.dtype) -> object:
        cfg = SAEConfig(
            architecture="topk", d_in=self.W_dec.shape[1], d_sae=self.cfg.width, k=self.cfg.k, hook_name=hook_name,
            model_name=model_name, apply_b_dec_to_input=True,
            # SAELens flattens [..., n_heads, d_head] hook_z inputs when told so; ours arrive flat either way
            reshape_activations="hook_z" if hook_name.endswith("attn.hook_z") else "none",
            metadata={"trained_by": "saescope train-sae", "context_size": self.cfg.context_len},
        )
        state = {n: p.detach().cpu() for n, p in self.named_parameters()}
        return build_sae(cfg, state, dtype=dtype)


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
def evaluate(lm: LoadedModel, sae, hook: str, contexts: list[list[int]], ce_contexts: int, batch: int) -> dict:
    """Held-out reconstruction metrics, firing fractions and CE-loss metrics of ``sae``.

    Tokens count by precompute's rule (``iter_activations``' mask: no position 0, special or massive-activation
    token), so the CE metrics splice and score exactly where a run's would. The reconstruction metrics count the
    massive tokens too (``explained_variance`` = ``explained_variance_with_massive``), which can dominate the
    variance; ``explained_variance_without_massive`` leaves them out, as a run's statistics do by default. The
    massive-token rule's median is per batch of ``batch`` contexts: the same tokens as a precompute over
    ``contexts`` when ``batch`` is its ``batch_size`` (docs/run-format.md, "Which tokens count").
    """
    stats, typical = ReconStats(sae.cfg.d_in), ReconStats(sae.cfg.d_in)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    masks: list[torch.Tensor] = []
    for ab in iter_activations(lm, hook, contexts, batch):
        assert ab.massive is not None  # iter_activations always flags them
        masks.append(ab.mask.cpu())
        counted = ab.mask | ab.massive
        x = ab.acts[counted].float().to(sae.device)
        out = sae(x)
        stats.update(x, out.x_hat, out.codes)
        keep = ab.mask[counted].to(sae.device)
        typical.update(x[keep], out.x_hat[keep], out.codes[keep])
        fires += (out.codes > 0).sum(0).cpu()
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
    return summary


def train_sae(lm: LoadedModel, cfg: TrainConfig, out: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Train a TopK SAE at ``cfg.hook_name`` and write an SAELens directory plus ``training_report.json``."""
    with lock.hold(Path(out).parent, f"saescope train-sae --out {out}", name=f".{Path(out).name}.saescope.lock"):
        out = prepare_output(out, force)
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

        trainer = TopKTrainer(d_in, cfg, lm.device)
        total_steps = max(1, cfg.tokens * cfg.reuse // cfg.batch_size)
        buffer = torch.empty(cfg.buffer_tokens, d_in, dtype=torch.float32, device=lm.device)
        fill, seen, step = 0, 0, 0
        log: list[dict] = []
        bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress, desc="train-sae")
        stream = iter_activations(lm, cfg.hook_name, train_iter, cfg.model_batch)
        carry = torch.empty(0, d_in, device=lm.device)
        exhausted = False
        while seen < cfg.tokens and not exhausted:
            while fill < cfg.buffer_tokens and seen < cfg.tokens:
                if not len(carry):
                    ab = next(stream, None)
                    if ab is None:
                        exhausted = True
                        break
                    carry = ab.acts[ab.mask].float()
                take = min(len(carry), cfg.buffer_tokens - fill, cfg.tokens - seen)
                buffer[fill : fill + take] = carry[:take]
                carry = carry[take:]
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
                trainer.init_b_dec(buffer[:fill])
            for _ in range(cfg.reuse):
                perm = torch.randperm(fill, device=lm.device)
                for i in range(0, fill - cfg.batch_size + 1, cfg.batch_size):
                    metrics = trainer.step(buffer[perm[i : i + cfg.batch_size]], _lr_scale(step, total_steps))
                    step += 1
                    if step % 10 == 0 or step == 1:
                        bar.set_postfix(
                            loss=f"{metrics['fvu']:.3f}", ev=f"{1 - metrics['fvu']:.3f}", l0=f"{metrics['l0']:.0f}",
                            dead=f"{metrics['dead']:.1%}",
                        )
                        log.append({"step": step, "tokens": seen, **metrics})
            fill = 0
        bar.close()
        train_seconds = time.time() - start
        sae = trainer.export(cfg.hook_name, lm.name, torch.float32)
        heldout = evaluate(lm, sae, cfg.hook_name, eval_ctx, cfg.ce_contexts, cfg.model_batch)
        window = min(cfg.dead_tokens, step * cfg.batch_size)
        heldout["dead_fraction"] = float((trainer.since_fired >= window).double().mean())
        report = {
            "settings": {**asdict(cfg), "model": lm.name, "d_in": d_in, "device": str(lm.device), "model_dtype": str(lm.dtype)},
            "tokens_seen": seen,
            "steps": step,
            "wall_time_seconds": round(time.time() - start, 1),
            "train_seconds": round(train_seconds, 1),
            "heldout": heldout,
            "log": log[-200:],
        }
        _write_atomically(out, sae, report)
        return report
