"""Reconstruction and downstream-loss metrics shared by training, precompute and the dashboard."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..model.loading import LoadedModel
from ..saes import SAE
from .interventions import splice_sae


class ReconStats:
    """Streaming sums for explained variance, MSE, cosine, L0 over many tokens (float64)."""

    def __init__(self, d_in: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_sq_x = torch.zeros((), dtype=torch.float64, device=device)
        self.sse = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_cos = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l0 = torch.zeros((), dtype=torch.float64, device=device)

    def update(
        self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor | None = None, *, n_active: int | None = None
    ) -> None:
        """Add tokens ``x, x_hat [n, d_in]`` and ``codes [n, d_sae]`` (or ``n_active``, their nonzero count)."""
        if codes is not None and n_active is None:
            l0 = (codes != 0).sum()
        elif codes is None and n_active is not None:
            l0 = int(n_active)
        else:
            raise ValueError("give exactly one of codes and n_active")
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum()
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_cos += F.cosine_similarity(x, x_hat, dim=-1).sum()
        self.sum_l0 += l0

    def merge(self, other: ReconStats) -> None:
        """Add another state's sums (tokens disjoint from this one's): the state of all the tokens."""
        self.n += other.n
        for name in ("sum_x", "sum_sq_x", "sse", "sum_cos", "sum_l0"):
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "explained_variance": explained_variance(self),
            "mse": float(self.sse / (n * self.sum_x.numel())),
            "cosine_sim": float(self.sum_cos / n),
            "l0": float(self.sum_l0 / n),
            "n_tokens": int(self.n),
        }


def explained_variance(*parts: ReconStats, minus: ReconStats | None = None) -> float:
    """``1 - SSE / sum ||x - mean(x)||^2`` (variance about the mean) over the tokens of ``parts`` (disjoint) taken
    together, less the tokens of ``minus`` (a subset of them); NaN without variance."""
    signed = [(p, 1.0) for p in parts] + ([(minus, -1.0)] if minus is not None else [])
    n = sum(sign * p.n for p, sign in signed)
    sum_x = sum(sign * p.sum_x.cpu() for p, sign in signed)
    sum_sq_x = sum(sign * float(p.sum_sq_x) for p, sign in signed)
    sse = sum(sign * float(p.sse) for p, sign in signed)
    total_var = sum_sq_x - float(torch.as_tensor(sum_x).pow(2).sum()) / n if n > 0 else 0.0
    return 1 - sse / total_var if total_var > 0 else float("nan")


def explained_variances(stats: ReconStats, massive: ReconStats | None, stats_count_massive: bool) -> dict:
    """Explained variance with and without the massive-activation tokens, from the statistic tokens' ``stats`` and
    the massive tokens' ``massive`` (None: not accumulated, so only the statistic tokens' variant is known).
    ``stats_count_massive``: the statistic tokens include the massive ones (``include_massive``)."""
    if massive is None:
        known = explained_variance(stats)
        return {"explained_variance_with_massive": known if stats_count_massive else None,
                "explained_variance_without_massive": None if stats_count_massive else known,
                "n_massive_tokens": None}
    if stats_count_massive:
        with_massive, without = explained_variance(stats), explained_variance(stats, minus=massive)
    else:
        with_massive, without = explained_variance(stats, massive), explained_variance(stats)
    return {"explained_variance_with_massive": with_massive, "explained_variance_without_massive": without,
            "n_massive_tokens": int(massive.n)}


@dataclass
class CEMetrics:
    """Next-token loss with the SAE spliced in, against clean and zero-ablated runs."""

    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_zero_ablation: float
    ce_loss_recovered: float
    kl_div: float
    n_predictions: int
    ce_loss_increase: float
    """Nats: ``ce_loss_with_sae - ce_loss_clean`` (the headline; the ratio hides how much loss is lost)."""
    ce_loss_increase_ci95: float | None
    """Half-width of its 95% interval: ``1.96 * std / sqrt(n)`` of the per-prediction increases (None: not summed)."""
    kl_div_with_ablation: float | None
    """Mean KL(clean || zero-ablated) (None: not summed)."""
    kl_score: float | None
    """``1 - kl_div / kl_div_with_ablation``."""

    def to_dict(self, extended: bool = False) -> dict[str, float | None]:
        """Every field (``extended``: what run manifests and training reports record), or only the six CE keys
        that manifests and reports written before the loss increase and KL score existed carry."""
        out = asdict(self)
        return out if extended else {k: out[k] for k in MANIFEST_CE_KEYS}


MANIFEST_CE_KEYS = ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div",
                    "n_predictions")
"""The CE keys of older run manifests; runs now record every ``CEMetrics`` field (``runwriter.CE_KEYS``)."""


def _loss_rows(
    clean: torch.Tensor, spliced: torch.Tensor, ablated: torch.Tensor, token_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position losses ``[batch, pos-1]`` from the three runs' logits, KL(clean || with SAE) and
    KL(clean || zero-ablated)."""
    targets = token_ids[:, 1:].to(clean.device).unsqueeze(-1)
    logp_clean = clean[:, :-1].float().log_softmax(-1)  # each log-softmax once: over a 50k vocabulary they dominate
    p_clean = logp_clean.exp()
    out = {"clean": -logp_clean.gather(-1, targets).squeeze(-1)}
    for key, kl_key, logits in (("sae", "kl", spliced), ("zero", "kl_zero", ablated)):
        logp = logits[:, :-1].float().log_softmax(-1)
        out[key] = -logp.gather(-1, targets).squeeze(-1)
        out[kl_key] = (p_clean * (logp_clean - logp)).sum(-1)
    return out


@torch.inference_mode()
def per_token_ce(lm: LoadedModel, sae: SAE, token_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position losses ``[batch, pos-1]`` clean / with SAE / zero-ablated and KL(clean || SAE).

    The SAE replaces (and zero ablation zeroes) the activation only where ``mask`` is true,
    so position 0 and special tokens stay clean like in training.
    """
    hook = sae.hook_out  # a transcoder's ablation zeroes what it writes (the MLP output)
    clean = lm.logits(token_ids)
    with splice_sae(lm, sae, mask=mask):
        spliced = lm.logits(token_ids)

    def zero(x: torch.Tensor) -> torch.Tensor:
        x_in = sae.select_input(x)  # a one-head SAE's ablation zeroes its head only (as SAELens does)
        keep = mask.to(x.device).reshape(*mask.shape, *([1] * (x_in.ndim - mask.ndim)))
        return sae.replace_input(x, torch.where(keep, torch.zeros_like(x_in), x_in))

    with lm.hooks.intervene(hook, zero):
        ablated = lm.logits(token_ids)
    return _loss_rows(clean, spliced, ablated, token_ids)


@torch.inference_mode()
def per_token_ce_from_acts(
    lm: LoadedModel, hook: str, token_ids: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, error: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``per_token_ce`` from activations already captured at ``hook`` (a residual-stream hook, see
    ``tail.can_resume``): ``x`` and the SAE's ``error = x - x_hat`` ``[batch, pos, d]``. Only the layers after
    the hook run, on the clean, spliced and zero-ablated rows of the contexts as one batch."""
    from ..model.tail import resume_logits

    keep = mask.to(x.device)[..., None]
    x = x.float()
    rows = torch.cat([x, torch.where(keep, x - error.float(), x), torch.where(keep, 0.0, x)])  # [3 * batch, pos, d]
    clean, spliced, ablated = resume_logits(lm, hook, rows.to(lm.device, lm.dtype)).chunk(3)
    return _loss_rows(clean, spliced, ablated, token_ids)


def ce_metrics(lm: LoadedModel, sae: SAE, token_ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 8) -> CEMetrics:
    """Aggregate CE loss recovered and KL over predictions made at masked positions."""
    totals: dict[str, float] = dict.fromkeys(("clean", "sae", "zero", "kl", "kl_zero", "sq_increase"), 0.0)
    count = 0
    for start in range(0, token_ids.shape[0], batch_size):
        ids, m = token_ids[start : start + batch_size], mask[start : start + batch_size]
        losses = per_token_ce(lm, sae, ids, m)
        pred_mask = m[:, :-1].to(losses["clean"].device)
        count += int(pred_mask.sum())
        for key, total in ce_totals(losses, pred_mask).items():
            totals[key] += total
    return summarize_ce(totals, count)


def ce_totals(rows: dict[str, torch.Tensor], pred: torch.Tensor) -> dict[str, float]:
    """What ``summarize_ce`` takes from ``per_token_ce`` rows: sums over the predictions where ``pred`` is true."""
    sums = {k: float(rows[k][pred].double().sum()) for k in ("clean", "sae", "zero", "kl", "kl_zero") if k in rows}
    sums["sq_increase"] = float((rows["sae"][pred].double() - rows["clean"][pred].double()).pow(2).sum())
    return sums


def summarize_ce(totals: dict[str, float], count: int) -> CEMetrics:
    """``CEMetrics`` from summed per-prediction losses (keys clean, sae, zero, kl; optional kl_zero and
    sq_increase, the sum of squared per-prediction increases) over ``count`` predictions."""
    if count == 0:
        raise ValueError("no predictions to score: every position was masked out")
    clean, with_sae, zero = (totals[k] / count for k in ("clean", "sae", "zero"))
    denom = zero - clean
    increase = with_sae - clean
    ci95 = None
    if "sq_increase" in totals and count > 1:
        var = max(totals["sq_increase"] - count * increase**2, 0.0) / (count - 1)  # sample variance
        ci95 = 1.96 * math.sqrt(var / count)
    kl_zero = totals["kl_zero"] / count if "kl_zero" in totals else None
    kl = totals["kl"] / count
    return CEMetrics(
        ce_loss_clean=clean,
        ce_loss_with_sae=with_sae,
        ce_loss_zero_ablation=zero,
        ce_loss_recovered=(zero - with_sae) / denom if denom != 0 else float("nan"),
        kl_div=kl,
        n_predictions=count,
        ce_loss_increase=increase,
        ce_loss_increase_ci95=ci95,
        kl_div_with_ablation=kl_zero,
        kl_score=1 - kl / kl_zero if kl_zero else None,
    )
