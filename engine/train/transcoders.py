"""Training per-layer TopK transcoders on every layer at once (``saescope train-transcoders``).

One forward of the model feeds every layer's trainer: each layer's MLP input (``blocks.L.ln2.hook_normalized``) and
output (``blocks.L.hook_mlp_out``) are captured together, and the transcoders of all layers are one stacked set of
tensors optimised with batched matrix products (as SAELens and sparsify train several hooks in one pass). The loss
of each layer is the fraction of its MLP output's variance left unexplained (FVU), plus the AuxK loss of dead
latents (scaled as in ``engine.train.sae``); decoder rows are kept at unit norm. Each layer's inputs and outputs are
scaled to a mean norm of sqrt(width) in training (scales from the first buffer, folded into the weights on export).

Training is resumable: after the buffer in which every ``checkpoint_every``-th step falls, the weights, the
optimiser's moments and the stream position go to ``OUT/.checkpoint/`` (safetensors + JSON, never a pickle) and the
transcoders so far to ``OUT/layer_L/`` (fp16, SAELens format) with a ``training_report.json`` marked
``"partial": true``; the same command run again goes on from there, and trains exactly as an uninterrupted run
(each buffer's shuffle depends on the seed and the buffer's number only).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import atomic, lock
from ..data.activations import batched, stats_mask
from ..data.corpus import corpus_files, iter_contexts
from ..model.hooks import interventions
from ..model.loading import LoadedModel
from ..model.machine import choose_dtype
from ..saes.transcoders import INPUT_HOOK, OUTPUT_HOOK, Transcoder
from .sae import check_budget

CHECKPOINT = ".checkpoint"
REPORT = "training_report.json"


@dataclass
class TranscoderTrainConfig:
    """Settings of one ``train-transcoders`` run."""

    corpus: str
    """Training corpus (file or directory)."""
    width: int
    """Latents per layer."""
    k: int
    """Latents kept per token."""
    tokens: int
    """Training tokens to stream (position 0 and special tokens excluded)."""
    layers: str = "all"
    """Layers to train: ``all``, or a list and ranges such as ``0-3,7``."""
    eval_corpus: str | None = None
    """Held-out corpus; when absent the first ``eval_contexts`` contexts of ``corpus`` are held out."""
    context_len: int = 128
    """Tokens per packed context."""
    model_batch: int = 16
    """Contexts per model forward."""
    batch_size: int = 2048
    """Tokens per optimisation step (every layer steps on the same tokens)."""
    buffer_tokens: int = 16384
    """Tokens held in the shuffle buffer (each holds every layer's input and output: memory grows with layers)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(width / 2**14)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary loss that revives dead latents."""
    dead_tokens: int = 500_000
    """A latent that has not fired for this many training tokens counts as dead."""
    eval_contexts: int = 32
    """Held-out contexts for the per-layer variance explained."""
    ce_contexts: int = 16
    """Held-out contexts for the CE loss recovered (per layer spliced alone, and all spliced)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and exports of the transcoders so far)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_budget(self)
        if self.checkpoint_every <= 0:
            raise ValueError(f"--checkpoint-every must be positive, got {self.checkpoint_every}")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all`` or ``0-3,7`` -> sorted layer indices, each checked against the model's ``n_layers``."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"--layers: cannot read {part!r} (use all, or a list such as 0-3,7)") from None
        if not 0 <= first <= last < n_layers:
            raise ValueError(f"--layers: {part!r} is outside this model's layers 0-{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


def _hooks(layers: list[int]) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in layers for kind in (INPUT_HOOK, OUTPUT_HOOK)]


class StackedTrainer(torch.nn.Module):
    """fp32 master weights of one TopK transcoder per layer, stacked on a leading layer axis."""

    def __init__(self, n: int, d_in: int, d_out: int, cfg: TranscoderTrainConfig, device: torch.device):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(n, cfg.width, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        W_enc = torch.randn(n, d_in, cfg.width, generator=gen)
        W_enc /= W_enc.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_enc.to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(n, cfg.width, device=device))
        self.W_dec = torch.nn.Parameter(W_dec.to(device))
        self.b_dec = torch.nn.Parameter(torch.zeros(n, d_out, device=device))
        self.base_lr = cfg.lr or 2e-4 / math.sqrt(cfg.width / 2**14)
        self.opt = torch.optim.Adam(self.parameters(), lr=self.base_lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(n, cfg.width, dtype=torch.long, device=device)
        """Training tokens since each latent last fired."""
        self.scale_in = torch.ones(n, device=device)
        self.scale_out = torch.ones(n, device=device)
        """Per layer: what the MLP inputs and outputs are multiplied by in training so their mean norm is sqrt(width)
        (MLP output norms differ by orders of magnitude across layers); folded into the weights on export."""
        self.autocast = device.type == "cuda" or (device.type == "cpu" and choose_dtype(device, d_in).dtype == "bfloat16")

    def init_scales(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """From the first buffer ``[layers, tokens, d]``: the normalising scales, and ``b_dec`` at the mean output."""
        with torch.no_grad():
            self.scale_in.copy_(x.shape[-1] ** 0.5 / x.norm(dim=-1).mean(1).clamp_min(1e-12))
            self.scale_out.copy_(y.shape[-1] ** 0.5 / y.norm(dim=-1).mean(1).clamp_min(1e-12))
            self.b_dec.copy_(y.mean(1) * self.scale_out[:, None])

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> dict[str, list[float]]:
        """One step on ``x [layers, batch, d_in]`` -> ``y [layers, batch, d_out]`` (float32); per-layer metrics."""
        since = self.since_fired
        x, y = x * self.scale_in[:, None, None], y * self.scale_out[:, None, None]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pre = torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc)
            values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter(-1, idx, values.relu())
            y_hat = torch.baddbmm(self.b_dec[:, None, :], codes, self.W_dec)
        err = y - y_hat.float()
        var = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        fvu = err.pow(2).sum((1, 2)) / var
        loss = fvu.sum()
        dead = since > self.cfg.dead_tokens
        n_dead = dead.sum(-1)
        if bool(n_dead.any()) and self.cfg.aux_coef > 0:
            k_aux_max = y.shape[-1] // 2
            k_aux = min(k_aux_max, int(n_dead.max()))
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                dead_pre = pre.masked_fill(~dead[:, None, :], -torch.inf)
                aux_vals, aux_idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
                aux_codes = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals.relu())
                e_hat = torch.bmm(aux_codes, self.W_dec)
            e = err.detach()
            aux = (e_hat.float() - e).pow(2).sum((1, 2)) / (e - e.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
            scale = (n_dead.float() / k_aux_max).clamp(max=1.0)
            loss = loss + self.cfg.aux_coef * (scale * aux).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = self.W_dec, self.W_dec.grad
            assert g is not None
            g -= (g * W).sum(-1, keepdim=True) * W
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * lr_scale
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            fired = (codes > 0).any(1)
            since += x.shape[1]
            since[fired] = 0
            l0 = (codes > 0).sum(-1).float().mean(1)
        return {"fvu": fvu.detach().tolist(), "l0": l0.tolist(), "dead": (n_dead.float() / self.cfg.width).tolist()}

    def transcoder(self, i: int, layer: int) -> Transcoder:
        """Layer ``i``'s transcoder on the model's own scales: ``W_enc * scale_in``, ``W_dec / scale_out``,
        ``b_dec / scale_out`` (the same codes, the prediction in the MLP output's units)."""
        s_in, s_out = float(self.scale_in[i]), float(self.scale_out[i])
        return Transcoder((self.W_enc[i] * s_in).detach().cpu(), self.b_enc[i].detach().cpu(),
                          (self.W_dec[i] / s_out).detach().cpu(), (self.b_dec[i] / s_out).detach().cpu(),
                          f"blocks.{layer}.{INPUT_HOOK}", f"blocks.{layer}.{OUTPUT_HOOK}", k=self.cfg.k)

    # --- checkpoints (safetensors + JSON) ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()}
        out["since_fired"] = self.since_fired.cpu()
        out["scale_in"], out["scale_out"] = self.scale_in.cpu(), self.scale_out.cpu()
        for n, p in self.named_parameters():
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"opt.{n}.{key}"] = st[key].cpu().contiguous()
            if "step" in st:
                out[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(tensors[n])
            self.since_fired.copy_(tensors["since_fired"])
            self.scale_in.copy_(tensors["scale_in"])
            self.scale_out.copy_(tensors["scale_out"])
        for n, p in self.named_parameters():
            if f"opt.{n}.exp_avg" in tensors:
                self.opt.state[p] = {"step": tensors[f"opt.{n}.step"].reshape(()).clone(),
                                     "exp_avg": tensors[f"opt.{n}.exp_avg"].to(p.device),
                                     "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"].to(p.device)}


def _lr_scale(step: int, total: int) -> float:
    """Linear warm-up over the first 50 steps (a tenth of a short run), constant, linear decay over the last 20%."""
    warmup = min(50, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * 0.8)
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def _capture(lm: LoadedModel, ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[layers, batch, pos, d]`` MLP inputs and outputs of one forward (stopping after the last wanted layer)."""
    acts = lm.capture(ids, _hooks(layers))
    x = torch.stack([acts[f"blocks.{layer}.{INPUT_HOOK}"] for layer in layers])
    y = torch.stack([acts[f"blocks.{layer}.{OUTPUT_HOOK}"] for layer in layers])
    return x, y


RESUME_MAY_CHANGE = ("tokens", "checkpoint_every", "eval_corpus", "eval_contexts", "ce_contexts")
"""Settings a resumed run may change: a longer or shorter budget (the learning-rate schedule follows the new one
from the step reached), checkpointing and evaluation. Any other change is refused."""


def _settings_key(cfg: TranscoderTrainConfig, layers: list[int], model: str) -> dict:
    return {**asdict(cfg), "layers": layers, "model": model}


def _same_training(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
    return strip(a) == strip(b)


def _save_checkpoint(out: Path, trainer: StackedTrainer, progress: dict) -> None:
    folder = out / CHECKPOINT
    with atomic.build_dir(folder) as tmp:
        save_file(trainer.state_tensors(), str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(progress))


def _load_checkpoint(out: Path, key: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    folder = out / CHECKPOINT
    if not (folder / "progress.json").is_file():
        return None
    progress = json.loads((folder / "progress.json").read_text())
    if not _same_training(progress.get("settings", {}), key):
        raise ValueError(f"{out} holds a checkpoint of other settings ({folder}/progress.json): use the same command "
                         "to resume, or --force to start over")
    return load_file(str(folder / "state.safetensors")), progress


@torch.no_grad()
def evaluate(lm: LoadedModel, transcoders: dict[int, Transcoder], contexts: list[list[int]], ce_contexts: int,
             batch: int) -> dict:
    """Per layer: fraction of MLP-output variance explained and L0 on ``contexts``; CE loss with each transcoder
    spliced in alone and with all spliced at once, against the clean model and zero-ablated MLP outputs, on the
    first ``ce_contexts`` contexts: CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)."""
    layers = sorted(transcoders)
    sse = {layer: 0.0 for layer in layers}
    sst: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    l0 = {layer: 0.0 for layer in layers}
    n_tok = 0
    for ids in batched(contexts, batch):
        x, y = _capture(lm, ids, layers)
        mask = stats_mask(ids, lm.special_token_ids).to(x.device)
        for i, layer in enumerate(layers):
            tc = transcoders[layer]
            xi, yi = x[i][mask].float(), y[i][mask].float()
            y_hat, codes = tc(xi)
            sse[layer] += float((yi - y_hat).pow(2).sum())
            sst[layer].append(yi)
            l0[layer] += float((codes > 0).sum())
        n_tok += int(mask.sum())
    per_layer = {}
    for layer in layers:
        y_all = torch.cat(sst[layer])
        total = float((y_all - y_all.mean(0)).pow(2).sum())
        per_layer[layer] = {"explained_variance": 1 - sse[layer] / max(total, 1e-12), "l0": l0[layer] / max(n_tok, 1)}

    ce_ctx = torch.tensor(contexts[:ce_contexts], dtype=torch.long)

    def ce(spliced: list[int], zero: list[int]) -> float:
        stash: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def fn(act: torch.Tensor) -> None:
                stash[layer] = act

            return fn

        def splice(layer: int):
            def fn(act: torch.Tensor) -> torch.Tensor:
                y_hat, _ = transcoders[layer](stash[layer].float())
                return y_hat.to(act.dtype)

            return fn

        pairs = [(f"blocks.{L}.{INPUT_HOOK}", keep(L)) for L in spliced]
        pairs += [(f"blocks.{L}.{OUTPUT_HOOK}", splice(L)) for L in spliced]
        pairs += [(f"blocks.{L}.{OUTPUT_HOOK}", lambda act: torch.zeros_like(act)) for L in zero]
        total, count = 0.0, 0
        with interventions(lm.hooks, pairs):
            for ids in batched(ce_ctx.tolist(), batch):
                logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits.float()
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(lm.device),
                                                           reduction="none")
                total += float(losses.sum())
                count += losses.numel()
        return total / max(count, 1)

    clean = ce([], [])
    for layer in layers:
        spliced, zero = ce([layer], []), ce([], [layer])
        per_layer[layer].update(ce_spliced=spliced, ce_zero_ablated=zero,
                                ce_loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else None)
    all_spliced, all_zero = ce(layers, []), ce([], layers)
    return {"ce_clean": clean, "ce_all_spliced": all_spliced, "ce_all_zero_ablated": all_zero,
            "ce_loss_recovered_all": (all_zero - all_spliced) / (all_zero - clean) if all_zero != clean else None,
            "eval_tokens": n_tok, "ce_tokens": int(ce_ctx.shape[0] * (ce_ctx.shape[1] - 1)),
            "layers": {str(layer): v for layer, v in per_layer.items()}}


def _export(out: Path, trainer: StackedTrainer, layers: list[int], model_name: str, report: dict) -> None:
    for i, layer in enumerate(layers):
        trainer.transcoder(i, layer).save(out / f"layer_{layer}", dtype=torch.float16, model_name=model_name)
    atomic.write_json(out / REPORT, report)


def train_transcoders(lm: LoadedModel, cfg: TranscoderTrainConfig, out: str | Path, *, progress: bool = True,
                      stop_after_steps: int | None = None) -> dict:
    """Train TopK transcoders on ``cfg.layers`` of ``lm`` into ``out`` (``layer_L/`` SAELens folders, fp16, and
    ``training_report.json``), resuming from ``out/.checkpoint`` when one of the same settings is there.
    ``stop_after_steps``: stop (checkpointed) after that many steps of this call, as an interrupted run would."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with lock.hold(out, f"saescope train-transcoders --out {out}"):
        layers = parse_layers(cfg.layers, lm.n_layers)
        for name in _hooks(layers):
            lm.hooks.check(name)
        corpus_files(cfg.corpus)
        d_in = lm.hook_width(f"blocks.{layers[0]}.{INPUT_HOOK}")
        d_out = lm.hook_width(f"blocks.{layers[0]}.{OUTPUT_HOOK}")
        key = _settings_key(cfg, layers, lm.name)
        torch.manual_seed(cfg.seed)
        trainer = StackedTrainer(len(layers), d_in, d_out, cfg, lm.device)
        resumed = _load_checkpoint(out, key)
        state = {"seen": 0, "step": 0, "contexts": 0, "buffers": 0, "train_seconds": 0.0, "log": []}
        if resumed is not None:
            trainer.load_tensors(resumed[0])
            state = {k: resumed[1][k] for k in state}
        start = time.time()
        contexts = iter_contexts(lm.tokenizer, cfg.corpus, cfg.context_len)
        if cfg.eval_corpus:
            eval_ctx = list(itertools.islice(iter_contexts(lm.tokenizer, cfg.eval_corpus, cfg.context_len), cfg.eval_contexts))
        else:
            eval_ctx = list(itertools.islice(contexts, cfg.eval_contexts))
        if not eval_ctx:
            raise ValueError(f"the evaluation corpus yields no context of {cfg.context_len} tokens")
        for _ in itertools.islice(contexts, state["contexts"]):  # resume: skip what earlier runs consumed
            pass
        total_steps = max(1, cfg.tokens // cfg.batch_size)
        n = len(layers)
        xbuf = torch.empty(n, cfg.buffer_tokens, d_in, device=lm.device)
        ybuf = torch.empty(n, cfg.buffer_tokens, d_out, device=lm.device)
        bar = tqdm(total=cfg.tokens, initial=state["seen"], unit="tok", unit_scale=True, disable=not progress,
                   desc="train-transcoders")
        steps_here = 0
        stopped = False
        exhausted = False

        def snapshot(partial: bool) -> dict:
            return {"settings": {**key, "d_in": d_in, "d_out": d_out, "device": str(lm.device),
                                 "model_dtype": str(lm.dtype)},
                    "partial": partial, "tokens_seen": state["seen"], "steps": state["step"],
                    "train_seconds": round(state["train_seconds"] + time.time() - start, 1), "log": state["log"][-100:]}

        while state["seen"] < cfg.tokens and not exhausted and not stopped:
            fill = 0
            while fill < cfg.buffer_tokens and state["seen"] + fill < cfg.tokens:
                rows = list(itertools.islice(contexts, cfg.model_batch))
                if not rows:
                    exhausted = True
                    break
                state["contexts"] += len(rows)
                ids = torch.tensor(rows, dtype=torch.long)
                x, y = _capture(lm, ids, layers)
                mask = stats_mask(ids, lm.special_token_ids).to(x.device)
                xs, ys = x[:, mask].float(), y[:, mask].float()
                take = min(xs.shape[1], cfg.buffer_tokens - fill, cfg.tokens - state["seen"] - fill)
                xbuf[:, fill : fill + take] = xs[:, :take]
                ybuf[:, fill : fill + take] = ys[:, :take]
                fill += take
            if fill < cfg.batch_size:
                if state["step"] == 0:
                    raise ValueError(f"the corpus gives only {fill} usable tokens, fewer than one batch of {cfg.batch_size}")
                break
            if state["step"] == 0:
                trainer.init_scales(xbuf[:, :fill], ybuf[:, :fill])
            # the shuffle of buffer i depends on (seed, i) only: a resumed run trains exactly as an uninterrupted one
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["buffers"])
            perm = torch.randperm(fill, generator=gen).to(lm.device)
            before = state["step"]
            for i in range(0, fill - cfg.batch_size + 1, cfg.batch_size):
                sel = perm[i : i + cfg.batch_size]
                metrics = trainer.step(xbuf[:, sel], ybuf[:, sel], _lr_scale(state["step"], total_steps))
                state["step"] += 1
                if state["step"] % 10 == 0 or state["step"] == 1:
                    mean_fvu = sum(metrics["fvu"]) / n
                    bar.set_postfix(ev=f"{1 - mean_fvu:.3f}", l0=f"{sum(metrics['l0']) / n:.0f}",
                                    dead=f"{sum(metrics['dead']) / n:.1%}")
                    state["log"].append({"step": state["step"], "tokens": state["seen"] + i + cfg.batch_size,
                                         "explained_variance": [round(1 - f, 4) for f in metrics["fvu"]],
                                         "dead": [round(d, 4) for d in metrics["dead"]]})
            state["seen"] += fill
            state["buffers"] += 1
            steps_here += state["step"] - before
            bar.update(fill)
            stopped = stop_after_steps is not None and steps_here >= stop_after_steps
            if stopped or state["step"] // cfg.checkpoint_every > before // cfg.checkpoint_every:
                elapsed = state["train_seconds"] + time.time() - start
                _export(out, trainer, layers, lm.name, snapshot(partial=True))
                _save_checkpoint(out, trainer, {**state, "train_seconds": elapsed, "settings": key})
        bar.close()
        if stopped and state["seen"] < cfg.tokens:
            return snapshot(partial=True)
        report: dict = snapshot(partial=False)
        transcoders = {layer: trainer.transcoder(i, layer).to(torch.float16).to(torch.float32)
                       for i, layer in enumerate(layers)}  # evaluated as stored
        report["heldout"] = evaluate(lm, transcoders, eval_ctx, cfg.ce_contexts, cfg.model_batch)
        window = min(cfg.dead_tokens, state["seen"])
        dead = (trainer.since_fired >= window).double().mean(-1).tolist()
        for i, layer in enumerate(layers):
            report["heldout"]["layers"][str(layer)]["dead_fraction"] = dead[i]
        report["wall_seconds"] = round(time.time() - start, 1)
        _export(out, trainer, layers, lm.name, report)
        return report
