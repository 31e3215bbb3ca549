"""Reconstruction and downstream-loss metrics shared by training, precompute and the dashboard."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..live.interventions import splice_sae
from ..model.loading import LoadedModel
from ..saes import SAE


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

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        return {
            "explained_variance": float(1 - self.sse / total_var) if total_var > 0 else float("nan"),
            "mse": float(self.sse / (n * self.sum_x.numel())),
            "cosine_sim": float(self.sum_cos / n),
            "l0": float(self.sum_l0 / n),
            "n_tokens": int(self.n),
        }


@dataclass
class CEMetrics:
    """Next-token loss with the SAE spliced in, against clean and zero-ablated runs."""

    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_zero_ablation: float
    ce_loss_recovered: float
    kl_div: float
    n_predictions: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _token_losses(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Loss of predicting ``token_ids[:, p+1]`` at position p: ``[batch, pos-1]``."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), token_ids[:, 1:].flatten().to(logits.device), reduction="none"
    ).view(token_ids.shape[0], -1)


def _loss_rows(
    clean: torch.Tensor, spliced: torch.Tensor, ablated: torch.Tensor, token_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position losses ``[batch, pos-1]`` from the three runs' logits, and KL(clean || with SAE)."""
    targets = token_ids[:, 1:].to(clean.device).unsqueeze(-1)
    logp_clean = clean[:, :-1].float().log_softmax(-1)  # each log-softmax once: over a 50k vocabulary they dominate
    logp_sae = spliced[:, :-1].float().log_softmax(-1)
    kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)
    return {
        "clean": -logp_clean.gather(-1, targets).squeeze(-1),
        "sae": -logp_sae.gather(-1, targets).squeeze(-1),
        "zero": _token_losses(ablated, token_ids),
        "kl": kl,
    }


@torch.inference_mode()
def per_token_ce(lm: LoadedModel, sae: SAE, token_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position losses ``[batch, pos-1]`` clean / with SAE / zero-ablated and KL(clean || SAE).

    The SAE replaces (and zero ablation zeroes) the activation only where ``mask`` is true,
    so position 0 and special tokens stay clean like in training.
    """
    hook = sae.cfg.hook_name
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
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for start in range(0, token_ids.shape[0], batch_size):
        ids, m = token_ids[start : start + batch_size], mask[start : start + batch_size]
        losses = per_token_ce(lm, sae, ids, m)
        pred_mask = m[:, :-1].to(losses["clean"].device)
        count += int(pred_mask.sum())
        for key in totals:
            totals[key] += float(losses[key][pred_mask].double().sum())
    return summarize_ce(totals, count)


def summarize_ce(totals: dict[str, float], count: int) -> CEMetrics:
    """``CEMetrics`` from summed per-prediction losses (keys clean, sae, zero, kl) over ``count`` predictions."""
    if count == 0:
        raise ValueError("no predictions to score: every position was masked out")
    clean, with_sae, zero = (totals[k] / count for k in ("clean", "sae", "zero"))
    denom = zero - clean
    return CEMetrics(
        ce_loss_clean=clean,
        ce_loss_with_sae=with_sae,
        ce_loss_zero_ablation=zero,
        ce_loss_recovered=(zero - with_sae) / denom if denom != 0 else float("nan"),
        kl_div=totals["kl"] / count,
        n_predictions=count,
    )
