"""The family table (``saescope family-table``): SAEs of several families at one hook, measured on the same held-out
tokens, side by side, written as ``family_table.parquet`` + ``family_table.json`` and printed as a markdown table.

Per SAE, from ``sae.evaluate`` (the held-out report ``train-sae`` writes, so nothing is computed twice): L0 (mean,
and the per-token distribution: 5th/50th/95th percentiles and a histogram), explained variance (with and without
the massive-activation tokens), CE loss recovered, KL to the clean model, the fraction of latents silent on the
held-out tokens, the dense fraction (firing on > 10% of them), and the dead fraction over training tokens from the
folder's ``training_report.json`` when it has one. A g-SAE is encoded with each token's loss gradient
(``evaluate(with_gradient=True)``); its CE metrics use the fallback rule (a spliced forward has no gradient).

**Steering effectiveness** (the g-SAE paper's claim, Olmo et al. 2025, as defined here): for each of
``steer_latents`` latents drawn (seeded) among those that fire on the held-out tokens,

- its promoted tokens ``T``: the top ``steer_top_tokens`` tokens of ``(d * g) @ W_U^T``, ``d`` the unit decoder
  direction, ``g`` the final norm's scale (the feature page's top logits);
- steering by strength ``s`` adds ``s * m * d`` at the hook at every position of ``steer_contexts`` held-out contexts
  (the same for every latent and SAE, unrelated to the latent), ``m`` the median activation norm of the held-out
  tokens at the hook (so ``s`` is in units of a typical activation);
- the fluency cost ``F(s)``: the mean teacher-forced next-token loss over the continuation (positions from
  ``steer_prompt`` on) steered, minus unsteered;
- the effect ``E(s)``: the mean over the continuation's positions and over ``T`` of ``log p_s(t) - log p_0(t)``;
- ``s*``: where ``F`` first reaches ``steer_fluency_cost`` nats, found on a geometric grid of strengths up to
  ``steer_max_strength`` (``COARSE``) then a linear grid inside the bracket (``FINE``), and linear interpolation;
  ``E`` and ``F`` are then measured at ``s*`` itself. A latent whose cost stays below the target up to the largest
  strength does not count.

The SAE's steering effectiveness is the mean over its latents of ``E(s*)`` (the shift at equal fluency cost) and of
``E(s*) / s*`` (per unit of strength); the fraction of latents that reached the target is reported beside them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import atomic, lock
from ..data.activations import iter_activations
from ..data.corpus import iter_contexts
from ..model.loading import LoadedModel
from ..model.tail import can_resume, resume_logits
from ..saes import SAE, load_sae
from .sae import evaluate

TABLE_FILE, INFO_FILE = "family_table.parquet", "family_table.json"
QUANTILES = (5, 50, 95)
COARSE, FINE = 8, 4
"""Steering search: strengths ``max * 2**-i`` (i = 7..0), then ``FINE`` evenly spaced inside the first bracket."""


@dataclass
class FamilyTableConfig:
    """Settings of ``family_table`` (recorded in ``family_table.json``)."""

    eval_corpus: str
    """Held-out corpus (file or directory): the same tokens for every SAE."""
    eval_contexts: int = 64
    """Held-out contexts for the reconstruction metrics."""
    ce_contexts: int = 32
    """Of those, contexts for the CE-loss metrics (three forwards each)."""
    context_len: int = 256
    """Tokens per packed context."""
    model_batch: int = 16
    """Contexts per model forward."""
    steer_latents: int = 32
    """Latents per SAE whose steering is measured (drawn among those firing on the held-out tokens; 0: none)."""
    steer_top_tokens: int = 5
    """Promoted tokens per latent (top of its decoder direction through the unembedding)."""
    steer_contexts: int = 4
    """Held-out contexts steered (after the evaluation contexts: unrelated to the latents)."""
    steer_len: int = 64
    """Tokens of each steered context."""
    steer_prompt: int = 16
    """Positions before the continuation whose loss and log-probabilities are measured."""
    steer_fluency_cost: float = 0.5
    """The equal fluency cost: the rise of the continuation's loss (nats per token) the strength is set to."""
    steer_max_strength: float = 16.0
    """Largest strength tried, in units of the median activation norm at the hook."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("eval_contexts", "ce_contexts", "context_len", "model_batch", "steer_top_tokens", "steer_contexts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steer_latents < 0:
            raise ValueError(f"--steer-latents must be >= 0, got {self.steer_latents}")
        if not 1 <= self.steer_prompt < self.steer_len - 1:
            raise ValueError(f"--steer-prompt must be between 1 and --steer-len - 2, got {self.steer_prompt}")
        if self.steer_len > self.context_len:
            raise ValueError(f"--steer-len {self.steer_len} exceeds --context-len {self.context_len}")
        if not self.steer_fluency_cost > 0 or not self.steer_max_strength > 0:
            raise ValueError("--steer-fluency-cost and --steer-max-strength must be positive")


# --- steering -----------------------------------------------------------------------------------------------------
def promoted_tokens(lm: LoadedModel, direction: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` tokens whose logits ``direction`` (a residual-stream direction) raises most, through the final
    norm's scale and the unembedding."""
    W_U = lm.unembed_matrix().detach().float()
    if direction.shape[-1] != W_U.shape[1]:
        raise ValueError(f"steering effectiveness needs a residual-stream SAE (d_in == d_model {W_U.shape[1]}), got "
                         f"d_in={direction.shape[-1]}")
    scores = (direction.float().to(W_U.device) * lm.final_norm_scale().to(W_U.device)) @ W_U.T
    return scores.topk(min(n, W_U.shape[0])).indices.cpu()


class Steerer:
    """Steering a model at ``hook`` on held-out contexts ``ids [C, len]``: the unsteered log-probabilities of the
    predictions of positions ``prompt .. len-2`` (made once), and ``curve`` for any direction."""

    ROWS = 16
    """Contexts x strengths per forward (bounds the logits held at once)."""

    @torch.inference_mode()
    def __init__(self, lm: LoadedModel, hook: str, ids: torch.Tensor, prompt: int):
        self.lm, self.hook, self.ids, self.prompt = lm, hook, ids, prompt
        # a residual-stream hook: the activation there is captured once and each steered forward resumes from it
        # (only the layers after the hook run); otherwise each is a full forward with the vector added at the hook
        self.resid = lm.capture(ids, hook)[hook] if can_resume(lm, hook) else None
        self.base_logp = self._logp(ids, None)
        self.targets = ids[:, prompt + 1 :]
        self.base_loss = self._loss(self.base_logp, self.targets)

    def _logp(self, ids: torch.Tensor, added: torch.Tensor | None) -> torch.Tensor:
        def fn(act: torch.Tensor) -> torch.Tensor:
            assert added is not None
            return (act.float() + added.to(act.device)[:, None, :]).to(act.dtype)

        if added is None:
            logits = self.lm.model(input_ids=ids.to(self.lm.device), use_cache=False).logits
        elif self.resid is not None:
            resid = self.resid.repeat(len(ids) // len(self.resid), 1, 1)
            steered = (resid.float() + added.to(resid.device)[:, None, :]).to(resid.dtype)
            logits = resume_logits(self.lm, self.hook, steered)
        else:
            with self.lm.hooks.intervene(self.hook, fn):
                logits = self.lm.model(input_ids=ids.to(self.lm.device), use_cache=False).logits
        return logits[:, self.prompt : -1].float().log_softmax(-1).cpu()

    @staticmethod
    def _loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's mean next-token loss ``[rows]`` (float64)."""
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().mean(-1)

    @torch.inference_mode()
    def curve(self, vector: torch.Tensor, strengths: torch.Tensor, tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, F)`` at each of ``strengths`` (the added vector is ``strength * vector``, at every position): the mean
        shift of the log-probability of ``tokens`` and the rise of the next-token loss, over the measured predictions
        of every context, against no steering."""
        n_c = self.ids.shape[0]
        base_promoted = self.base_logp[..., tokens].double().mean((-1, -2))  # [C]
        effects, costs = [], []
        per = max(1, self.ROWS // n_c)
        for start in range(0, len(strengths), per):
            s = strengths[start : start + per].float().cpu()
            added = s.repeat_interleave(n_c)[:, None] * vector.float().cpu()[None, :]  # strength-major rows
            logp = self._logp(self.ids.repeat(len(s), 1), added)
            loss = self._loss(logp, self.targets.repeat(len(s), 1)).reshape(len(s), n_c)
            promoted = logp[..., tokens].double().mean((-1, -2)).reshape(len(s), n_c)
            effects.append((promoted - base_promoted).mean(-1))
            costs.append((loss - self.base_loss).mean(-1))
        return torch.cat(effects).float(), torch.cat(costs).float()


def strength_at_cost(strengths: np.ndarray, cost: np.ndarray, target: float) -> tuple[float, float] | None:
    """The bracket ``(lo, hi)`` of ``strengths`` (increasing) where ``cost`` first reaches ``target``; None if never."""
    above = np.nonzero(cost >= target)[0]
    if not len(above):
        return None
    i = int(above[0])
    return (0.0 if i == 0 else float(strengths[i - 1])), float(strengths[i])


def steer_latent(steerer: Steerer, direction: torch.Tensor, scale: float, cfg: FamilyTableConfig) -> dict:
    """One latent's steering record (see the module docstring); strengths in units of ``scale``."""
    unit = direction.float().cpu() / direction.float().norm().clamp_min(1e-12).cpu()
    tokens = promoted_tokens(steerer.lm, unit, cfg.steer_top_tokens)
    coarse = torch.tensor([cfg.steer_max_strength * 2.0 ** -i for i in range(COARSE - 1, -1, -1)])
    _, cost = steerer.curve(unit * scale, coarse, tokens)
    found = strength_at_cost(coarse.numpy(), cost.numpy(), cfg.steer_fluency_cost)
    record = {"promoted_tokens": tokens.tolist(), "reached": found is not None, "strength": None, "shift": None,
              "shift_per_unit": None, "fluency_cost": None}
    if found is None:
        return record
    lo, hi = found
    fine = torch.linspace(lo, hi, FINE + 1)[1:]
    _, f_cost = steerer.curve(unit * scale, fine, tokens)
    grid = np.concatenate([[lo], fine.numpy()])
    lo_cost = 0.0 if lo == 0 else float(cost[int(np.nonzero(coarse.numpy() == lo)[0][0])])
    costs = np.concatenate([[lo_cost], f_cost.numpy()])
    lo2, hi2 = strength_at_cost(grid, costs, cfg.steer_fluency_cost) or (lo, hi)
    c_lo, c_hi = float(np.interp(lo2, grid, costs)), float(np.interp(hi2, grid, costs))
    s_star = hi2 if c_hi == c_lo else lo2 + (hi2 - lo2) * (cfg.steer_fluency_cost - c_lo) / (c_hi - c_lo)
    e_star, f_star = steerer.curve(unit * scale, torch.tensor([s_star]), tokens)
    record.update(strength=s_star, shift=float(e_star[0]), shift_per_unit=float(e_star[0]) / s_star,
                  fluency_cost=float(f_star[0]))
    return record


# --- the table ----------------------------------------------------------------------------------------------------
def _histogram(l0: np.ndarray, d_sae: int) -> dict:
    top = max(int(l0.max()) if len(l0) else 0, 1)
    edges = np.unique(np.linspace(0, top + 1, min(top + 1, 40) + 1).round()).astype(int)
    counts, _ = np.histogram(l0, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "d_sae": d_sae}


def measure_sae(lm: LoadedModel, sae: SAE, eval_ctx: list[list[int]], steerer: Steerer | None, scale: float,
                cfg: FamilyTableConfig, progress: bool = False) -> tuple[dict, dict]:
    """One SAE's row of the table and its details (L0 histogram, per-latent steering)."""
    hook = sae.cfg.hook_name
    collect: dict[str, torch.Tensor] = {}
    held = evaluate(lm, sae, hook, eval_ctx, cfg.ce_contexts, cfg.model_batch,
                    with_gradient=bool(sae.needs_loss_gradient), collect=collect)
    l0 = collect["l0"].numpy()
    q = np.percentile(l0, QUANTILES) if len(l0) else [float("nan")] * len(QUANTILES)
    row = {
        "l0_mean": float(l0.mean()) if len(l0) else float("nan"),
        **{f"l0_p{p}": float(v) for p, v in zip(QUANTILES, q, strict=True)},
        "explained_variance": held["explained_variance"],
        "explained_variance_without_massive": held["explained_variance_without_massive"],
        "ce_loss_recovered": held["ce_loss_recovered"],
        "kl_div": held["kl_div"],
        "heldout_silent_fraction": held["heldout_silent_fraction"],
        "dense_fraction": held["dense_fraction"],
        "n_tokens": int(held["n_tokens"]),
    }
    live = torch.nonzero(collect["fires"] > 0).flatten()
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen = live[torch.randperm(len(live), generator=gen)[: cfg.steer_latents]].sort().values.tolist()
    steering = []
    for latent in tqdm(chosen, desc=f"steering {sae.cfg.architecture}", unit="latent", disable=not progress):
        if steerer is not None:
            steering.append({"latent": latent, **steer_latent(steerer, sae.W_dec[latent].detach(), scale, cfg)})
    reached = [s for s in steering if s["reached"]]
    row.update(
        steer_latents=len(steering),
        steer_reached_fraction=len(reached) / len(steering) if steering else float("nan"),
        steer_shift=float(np.mean([s["shift"] for s in reached])) if reached else float("nan"),
        steer_shift_per_unit=float(np.mean([s["shift_per_unit"] for s in reached])) if reached else float("nan"),
        steer_strength_median=float(np.median([s["strength"] for s in reached])) if reached else float("nan"),
    )
    return row, {"l0_histogram": _histogram(l0, sae.cfg.d_sae), "steering": steering}


def median_norm(lm: LoadedModel, hook: str, contexts: list[list[int]], batch: int) -> float:
    """Median activation norm at ``hook`` over the counted tokens of ``contexts`` (the steering strength's unit)."""
    norms = [ab.acts[ab.mask].float().norm(dim=-1).cpu() for ab in iter_activations(lm, hook, contexts, batch)]
    return float(torch.cat(norms).median())


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over an SAE folder's ``cfg.json`` and safetensors files (names and bytes): what a measured row
    depends on besides the table's settings."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name == "cfg.json" or path.suffix == ".safetensors":
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _reusable(out: Path, fingerprint: dict) -> dict[str, tuple[dict, dict]]:
    """Rows of the table already in ``out`` measured with the same settings, model, dtype and hook, by SAE name:
    ``{name: (row, details)}`` (details carry the folder digest to compare); empty where there is none."""
    found = read_family_table(out)
    if found is None:
        return {}
    table, info = found
    if any(info.get(k) != v for k, v in fingerprint.items()):
        return {}
    rows = {r["sae"]: r for r in table.to_dict("records")}
    return {name: (rows[name], detail) for name, detail in info.get("saes", {}).items()
            if name in rows and detail.get("digest")}


def family_table(lm: LoadedModel, saes: Sequence[str | Path], cfg: FamilyTableConfig, out: str | Path,
                 names: list[str] | None = None, progress: bool = False, reuse: bool = True) -> pd.DataFrame:
    """Measure the SAE folders ``saes`` (one hook, one model) on the same held-out tokens; write
    ``out/family_table.parquet`` and ``out/family_table.json`` atomically; return the table.

    With ``reuse``, a row already in ``out`` is kept instead of measured again when the table there was made with
    the same settings, model, dtype and hook and the SAE's folder is byte-identical (``folder_digest``): each row
    depends only on those (the held-out and steered contexts, the strength unit and each SAE's seeded latents are
    the same whichever SAEs share the table), so adding an SAE to a table measures that SAE alone."""
    if not saes:
        raise ValueError("the family table needs at least one SAE folder")
    names = names or [Path(p).name for p in saes]
    if len(set(names)) != len(names):
        raise ValueError(f"two SAE folders share a name ({', '.join(names)}): give folders with distinct names")
    loaded = [load_sae(p, device=lm.device) for p in saes]
    hooks = {s.cfg.hook_name for s in loaded}
    if len(hooks) != 1:
        raise ValueError(f"the SAEs of a family table must share one hook, got {', '.join(sorted(map(str, hooks)))}")
    hook = loaded[0].cfg.hook_name
    lm.hooks.check(hook)
    started = time.time()
    contexts = list(itertools.islice(iter_contexts(lm.tokenizer, cfg.eval_corpus, cfg.context_len),
                                     cfg.eval_contexts + cfg.steer_contexts))
    if len(contexts) < cfg.eval_contexts + (cfg.steer_contexts if cfg.steer_latents else 0):
        raise ValueError(f"{cfg.eval_corpus} gives {len(contexts)} contexts of {cfg.context_len} tokens; the table needs "
                         f"{cfg.eval_contexts} + {cfg.steer_contexts} (--eval-contexts + --steer-contexts)")
    eval_ctx, steer_ctx = contexts[: cfg.eval_contexts], contexts[cfg.eval_contexts :]
    steer_ids = torch.tensor([c[: cfg.steer_len] for c in steer_ctx], dtype=torch.long)
    scale = median_norm(lm, hook, eval_ctx, cfg.model_batch)
    steerer = Steerer(lm, hook, steer_ids, cfg.steer_prompt) if cfg.steer_latents else None
    out = Path(out)
    fingerprint = {"settings": _finite(asdict(cfg)), "model": lm.name, "dtype": str(lm.dtype), "hook": hook}
    with lock.hold(out, f"saescope family-table --out {out}"):
        previous = _reusable(out, fingerprint) if reuse else {}
        rows, details, measured = [], {}, []
        for name, path, sae in zip(names, saes, loaded, strict=True):
            digest = folder_digest(path)
            old = previous.get(name)
            if old is not None and old[1]["digest"] == digest:
                rows.append(old[0])
                details[name] = {**old[1], "folder": str(path)}
                continue
            measured.append(name)
            tick = time.time()
            row, detail = measure_sae(lm, sae, eval_ctx, steerer, scale, cfg, progress)
            report = Path(path) / "training_report.json"
            trained = json.loads(report.read_text()) if report.is_file() else {}
            family = sae.cfg.architecture + (" (matryoshka)" if sae.cfg.matryoshka_widths else "")
            rows.append({"sae": name, "architecture": family, "d_sae": sae.cfg.d_sae, **row,
                         "dead_fraction_training": trained.get("heldout", {}).get("dead_fraction")})
            details[name] = {"folder": str(path), "digest": digest, **detail, "seconds": round(time.time() - tick, 1),
                             "training_settings": {k: trained.get("settings", {}).get(k) for k in
                                                   ("architecture", "tokens", "k", "width", "gradient_beta",
                                                    "matryoshka_widths", "trained_in_one_pass_with")}}
        table = pd.DataFrame(rows)
        info = {**fingerprint, "median_norm": scale, "seconds": round(time.time() - started, 1), "measured": measured,
                "saes": details, "markdown": markdown(table)}
        atomic.write_file(out / TABLE_FILE, lambda tmp: table.to_parquet(tmp, index=False))
        atomic.write_json(out / INFO_FILE, _finite(info))
    return table


def _finite(value):
    """JSON has no NaN: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


COLUMNS = {
    "sae": "SAE", "architecture": "family", "l0_mean": "L0 mean", "l0_p5": "L0 p5", "l0_p50": "L0 p50",
    "l0_p95": "L0 p95", "explained_variance_without_massive": "EV", "explained_variance": "EV (all)",
    "ce_loss_recovered": "CE rec.", "kl_div": "KL",
    "heldout_silent_fraction": "silent", "dead_fraction_training": "dead (train)", "dense_fraction": "dense",
    "steer_shift": "steer Δlogp", "steer_shift_per_unit": "Δlogp / unit", "steer_reached_fraction": "reached",
}
"""The markdown table's columns and headers."""


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (README-ready)."""
    cols = [c for c in COLUMNS if c in table.columns]

    def cell(v) -> str:
        if isinstance(v, str):
            return v.replace("|", "\\|")
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in table.to_dict("records")]
    return "\n".join(lines)


def read_family_table(folder: str | Path) -> tuple[pd.DataFrame, dict] | None:
    """A written family table and its details, or None where ``folder`` holds none."""
    folder = Path(folder)
    if not (folder / TABLE_FILE).is_file() or not (folder / INFO_FILE).is_file():
        return None
    return pd.read_parquet(folder / TABLE_FILE), json.loads((folder / INFO_FILE).read_text())
