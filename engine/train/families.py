"""One trainer per SAE family: what a training step selects, which auxiliary loss it adds and what it exports.

- ``topk``: TopK per token; AuxK on dead latents (Gao et al., scaled as sparsify does).
- ``gradient_topk`` (g-SAE): TopK over ``z + beta * z * |W_dec grad_x L|`` with each token's loss gradient.
- ``feature_choice``: each latent keeps its top m = floor(k*N/width) tokens of the batch; ``aux_zipf_loss``.
- ``mutual_choice``: the batch's k*N largest (token, latent) values; ``aux_zipf_loss``.
- ``matryoshka``: mutual choice's rule (BatchTopK) plus one reconstruction loss per nested prefix, as SAELens's
  Matryoshka BatchTopK trainer adds them; exported as JumpReLU with one global threshold and the prefix widths.

``aux_zipf_loss`` (Ayonrinde 2024) as read here: AuxK with "dead" widened to "under-used": latents whose firing rate
(an EMA over steps) is below their target, which is their capacity m/N for feature choice and, for mutual choice,
a Zipf law over the latents' firing-rate ranks, ``k / (r * H_width)`` at rank r (targets summing to k per token).
Dead latents are always under-used, so with no other latent under-used it is AuxK.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from ..model.machine import choose_dtype
from ..saes import SAEConfig, build_sae
from ..saes.feature_choice import feature_capacity, feature_choice_codes, feature_choice_thresholds
from ..saes.gradient_topk import gradient_scores
from ..saes.mutual_choice import mutual_choice_codes, mutual_choice_threshold

if TYPE_CHECKING:
    from .sae import TrainConfig


class TopKTrainer(torch.nn.Module):
    """fp32 master weights of a TopK SAE plus the optimiser and dead-latent bookkeeping; the other families
    override ``select``, ``aux_mask``, ``extra_loss``, ``batch_threshold`` and ``export_cfg``."""

    architecture: ClassVar[str] = "topk"
    needs_gradient: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    """Its inference rule has thresholds calibrated after training (``calibrate``)."""

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
        # bookkeeping saved with a checkpoint (``buffers``): tokens since each latent last fired; an EMA over steps
        # of its firing rate in a batch; the inference threshold(s) the batch rule implies (batch-rule families,
        # set by ``calibrate`` once training is done; -1 before)
        self.register_buffer("since_fired", torch.zeros(cfg.width, dtype=torch.long, device=device))
        self.register_buffer("density", torch.zeros(cfg.width, device=device))
        self.register_buffer("threshold", torch.full((cfg.width,), -1.0, device=device))
        self.since_fired: torch.Tensor
        self.density: torch.Tensor
        self.threshold: torch.Tensor
        # bf16 autocast where bf16 is fast: CUDA, and CPUs where the machine's micro-benchmark says so
        self.autocast = device.type == "cuda" or (device.type == "cpu" and choose_dtype(device, d_in).dtype == "bfloat16")

    def init_b_dec(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(x.mean(0))

    # --- what each family changes -------------------------------------------------------------
    def select(self, pre: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        """Codes ``[N, width]`` (differentiable in ``pre``) from pre-activations ``[N, width]``."""
        values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    def aux_mask(self) -> torch.Tensor:
        """Latents the auxiliary loss recruits: the dead ones (AuxK)."""
        return self.since_fired > self.cfg.dead_tokens

    def extra_loss(self, x: torch.Tensor, codes: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor | None:
        return None

    def batch_threshold(self, pre: torch.Tensor) -> torch.Tensor | None:
        """``[width]`` thresholds that reproduce the batch rule on the batch ``pre`` (None: not a batch rule)."""
        return None

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the inference thresholds from the final weights: the mean over ``x``'s batches (``batch_size`` rows
        each, in order; a last partial batch is left out unless it is the only one) of the thresholds that reproduce
        the batch rule on each."""
        n = min(self.cfg.batch_size, len(x))
        found = []
        for i in range(0, len(x) - n + 1, n) if n else ():
            pre = ((x[i : i + n] - self.b_dec) @ self.W_enc + self.b_enc).float()
            value = self.batch_threshold(pre)
            if value is not None:
                found.append(value)
        if found:
            self.threshold.copy_(torch.stack(found).mean(0))

    def export_cfg(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """SAEConfig fields and extra tensors of the exported SAE."""
        return {"architecture": "topk", "k": self.cfg.k}, {}

    # --- the step -----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, lr_scale: float, grad: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step on ``x [batch, d_in]`` (float32); ``grad`` is the loss gradient (g-SAE only)."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            codes = self.select(pre, grad)
            x_hat = codes @ self.W_dec + self.b_dec
        err = x - x_hat.float()
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        extra = self.extra_loss(x, codes, total_var)
        if extra is not None:
            loss = loss + extra
        recruit = self.aux_mask()
        n_aux = int(recruit.sum())
        if n_aux and self.cfg.aux_coef > 0:
            # AuxK as in sparsify / Gao et al.: up to d_in / 2 recruited latents model the residual, and the loss is
            # scaled down while fewer latents than that are recruited
            k_aux_max = x.shape[-1] // 2
            k_aux = min(k_aux_max, n_aux)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                aux_pre = pre.masked_fill(~recruit, -torch.inf)
                aux_vals, aux_idx = aux_pre.topk(k_aux, dim=-1, sorted=False)
                aux_codes = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals.relu())
                e_hat = aux_codes @ self.W_dec
            e = err.detach()
            aux = (e_hat.float() - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
            loss = loss + self.cfg.aux_coef * min(n_aux / k_aux_max, 1.0) * aux
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
            active = codes > 0
            fired = active.any(0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            rate = active.float().mean(0)
            first = bool((self.density == 0).all())
            self.density.mul_(0.0 if first else 0.99).add_(rate, alpha=1.0 if first else 0.01)
            per_token = active.sum(-1).float()
        return {"fvu": float(fvu.detach()), "l0": float(per_token.mean()), "l0_std": float(per_token.std()),
                "dead": int((self.since_fired > self.cfg.dead_tokens).sum()) / self.cfg.width, "aux_latents": n_aux}

    def export(self, hook_name: str, model_name: str, dtype: torch.dtype):
        fields, extra = self.export_cfg()
        cfg = SAEConfig(
            d_in=self.W_dec.shape[1], d_sae=self.cfg.width, hook_name=hook_name, model_name=model_name,
            apply_b_dec_to_input=True,
            # SAELens flattens [..., n_heads, d_head] hook_z inputs when told so; ours arrive flat either way
            reshape_activations="hook_z" if hook_name.endswith("attn.hook_z") else "none",
            metadata={"trained_by": "saescope train-sae", "context_size": self.cfg.context_len,
                      "trained_as": self.cfg.architecture, "batch_tokens": self.cfg.batch_size},
            **fields,
        )
        state = {n: p.detach().cpu() for n, p in self.named_parameters()}
        state.update({n: t.detach().cpu() for n, t in extra.items()})
        return build_sae(cfg, state, dtype=dtype)


class GradientTopKTrainer(TopKTrainer):
    """g-SAE: the step's TopK ranks ``z + beta * z * |W_dec grad|`` (each token's next-token loss gradient)."""

    architecture = "gradient_topk"
    needs_gradient = True

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            raise ValueError("a g-SAE training step needs the loss gradient at the hook for every token")
        with torch.no_grad():
            score = gradient_scores(pre.float(), grad, self.W_dec.detach(), self.cfg.gradient_beta)
            idx = score.topk(self.cfg.k, dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())

    def export_cfg(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"architecture": "gradient_topk", "k": self.cfg.k, "gradient_beta": self.cfg.gradient_beta}, {}


class _ZipfAux(TopKTrainer):
    """aux_zipf_loss: the auxiliary loss recruits dead and under-used latents (``target_density``)."""

    def target_density(self) -> torch.Tensor:
        raise NotImplementedError

    def aux_mask(self) -> torch.Tensor:
        if bool((self.density == 0).all()):  # no step yet: no rate to compare
            return super().aux_mask()
        return super().aux_mask() | (self.density < self.target_density())


class FeatureChoiceTrainer(_ZipfAux):
    """Feature choice: each latent keeps its top m = floor(k*N/width) tokens of the batch."""

    architecture = "feature_choice"
    calibrated = True

    def capacity(self, n_tokens: int) -> int:
        return feature_capacity(self.cfg.k, n_tokens, self.cfg.width)

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return feature_choice_codes(pre, self.capacity(pre.shape[0]))

    def target_density(self) -> torch.Tensor:
        cap = self.capacity(self.cfg.batch_size) / self.cfg.batch_size
        return torch.full_like(self.density, cap)

    def batch_threshold(self, pre: torch.Tensor) -> torch.Tensor | None:
        return feature_choice_thresholds(pre, self.capacity(pre.shape[0]))

    def export_cfg(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"architecture": "feature_choice", "k": self.cfg.k}, {"threshold": self.threshold.clamp_min(0)}


class MutualChoiceTrainer(_ZipfAux):
    """Mutual choice: the batch's k*N largest (token, latent) values fire."""

    architecture = "mutual_choice"
    calibrated = True

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return mutual_choice_codes(pre, self.cfg.k * pre.shape[0])

    def target_density(self) -> torch.Tensor:
        width = self.cfg.width
        ranks = torch.empty(width, device=self.density.device)
        ranks[self.density.argsort(descending=True)] = torch.arange(1, width + 1, device=ranks.device, dtype=ranks.dtype)
        harmonic = float((1.0 / torch.arange(1, width + 1, dtype=torch.float64)).sum())
        return (self.cfg.k / (ranks * harmonic)).clamp_max(1.0)

    def batch_threshold(self, pre: torch.Tensor) -> torch.Tensor | None:
        return torch.full_like(self.threshold, mutual_choice_threshold(pre, self.cfg.k * pre.shape[0]))

    def global_threshold(self) -> float:
        return max(0.0, float(self.threshold[0]))

    def export_cfg(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"architecture": "mutual_choice", "k": self.cfg.k, "global_threshold": self.global_threshold()}, {}


class MatryoshkaTrainer(MutualChoiceTrainer):
    """Matryoshka BatchTopK: BatchTopK's rule, AuxK on dead latents, and each inner prefix's reconstruction loss
    added to the full one (SAELens's ``inner_mse_loss_{width}``, here normalised by the batch variance as the main
    loss is)."""

    architecture = "matryoshka"

    def aux_mask(self) -> torch.Tensor:
        return TopKTrainer.aux_mask(self)

    def extra_loss(self, x: torch.Tensor, codes: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor | None:
        widths = self.cfg.widths()
        loss = None
        decoded = self.b_dec.float()
        start = 0
        for end in widths[:-1]:
            decoded = decoded + codes[:, start:end].float() @ self.W_dec[start:end]
            inner = (x - decoded).pow(2).sum() / total_var
            loss = inner if loss is None else loss + inner
            start = end
        return loss

    def export_cfg(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return ({"architecture": "jumprelu", "matryoshka_widths": self.cfg.widths()},
                {"threshold": torch.full_like(self.threshold, self.global_threshold())})


TRAINERS: dict[str, type[TopKTrainer]] = {
    cls.architecture: cls
    for cls in (TopKTrainer, GradientTopKTrainer, FeatureChoiceTrainer, MutualChoiceTrainer, MatryoshkaTrainer)
}
"""``train-sae --architecture`` -> its trainer."""
