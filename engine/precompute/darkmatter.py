"""SAE dark matter: a linear map from the activation ``x`` to the SAE error ``e = x - x_hat``, in one pass.

Following "Decomposing the Dark Matter of Sparse Autoencoders" (Engels et al.), we fit ``e ~ x @ W + b``
(ridge least squares) and a scalar probe ``||e|| ~ x @ w + c``. Only sufficient statistics are kept:
``X^T X``, ``X^T [E, |E|]``, sums and sums of squares, separately for held-in tokens (fitting) and
held-out tokens (scoring), so both fits and their held-out R^2 come in closed form after a single pass.
The held-out tokens are those of every tenth context (``sampling.is_heldout``); R^2 pools the dimensions.

Beside it, the paper's own quantities (its repository's ``utils.run_lstsq`` and ``calculate_r_squared``): a
least-squares fit *without* bias of ``e`` and of ``||e||^2`` on ``x``, fitted and scored on a random token split
(``token_split``, keyed on context and position), R^2 averaged over the error's dimensions (``paper_*`` metrics),
on the positions ``paper_positions`` only when it is set (the paper: 1-1022 of 1024-token contexts; 200-1022 for
its ``||e||^2`` headline).

Numerics: per-batch products run in float32 on data shifted by a fixed point (the first batch's mean),
which keeps the statistics well conditioned; running totals are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PAPER_HELDOUT_FRACTION = 0.5
"""Share of the tokens the paper-style fit is scored on (the paper fits on 150k random tokens, scores on 150k)."""
PAPER_SPLIT_SEED = 0
"""Seed of ``token_split``'s hash."""
_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 values in ``[0, 2^32)`` (products stay below 2^59)."""
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & _MASK32
    return (h >> 16) ^ h


def token_split(context_ids: torch.Tensor, positions: torch.Tensor, fraction: float = PAPER_HELDOUT_FRACTION,
                seed: int = PAPER_SPLIT_SEED) -> torch.Tensor:
    """Held-out flags ``[n]`` of a seeded random token split: token (``context_ids[j]``, ``positions[j]``) is held
    out when a seeded 32-bit hash of the pair falls below ``fraction`` of the range. A function of where the token
    is, not of its activation, so batching, sharding and workers whose activations differ in the low bits all put a
    token on the same side."""
    ctx = context_ids.to(torch.int64) & _MASK32
    pos = positions.to(torch.int64).to(ctx.device) & _MASK32
    h = _mix32(ctx ^ (seed * 0x9E3779B1 & _MASK32))
    h = _mix32((h + pos * 0x85EBCA6B) & _MASK32)
    return h < int(fraction * 2**32)


def parse_positions(text: str | None) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)``, the inclusive range of positions the paper-style fit uses (None: every position)."""
    if text is None or not text.strip():
        return None
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"positions must be FIRST:LAST (inclusive, e.g. 1:1022), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"positions must be FIRST:LAST with 0 <= FIRST <= LAST, got {text!r}")
    return lo, hi


@dataclass(frozen=True)
class LinearErrorMap:
    """The fitted maps and their scores."""

    W: torch.Tensor
    """``[d_in, d_in]`` float32: predicted error ``x @ W + b``."""
    b: torch.Tensor
    """``[d_in]``."""
    w_norm: torch.Tensor
    """``[d_in]``: predicted error norm ``x @ w_norm + b_norm``."""
    b_norm: float
    metrics: dict[str, Any]
    """``heldout_error_r2`` (fraction of the held-out error variance the map predicts), ``heldout_norm_r2``,
    the same on held-in tokens, token counts and the ridge used; the ``paper_*`` quantities (``paper_metrics``)."""

    def split(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearly predictable and nonlinear parts of errors ``e [n, d_in]`` of activations ``x [n, d_in]``."""
        linear = x.float() @ self.W.to(x.device) + self.b.to(x.device)
        return linear, e.float() - linear


class Moments:
    """Sums over tokens of shifted ``x [n, d]`` and targets ``y [n, q]`` (float64 totals)."""

    def __init__(self, d: int, q: int, device: torch.device | str):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.n = 0
        self.sx, self.sy = zeros(d), zeros(q)
        self.xx, self.xy = zeros(d, d), zeros(d, q)
        self.yy = zeros(q)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not len(x):
            return
        self.n += x.shape[0]
        self.sx += x.sum(0).double()
        self.sy += y.sum(0).double()
        self.xx += (x.T @ x).double()
        self.xy += (x.T @ y).double()
        self.yy += y.pow(2).sum(0).double()

    def merge(self, other: Moments, dx: torch.Tensor, dy: torch.Tensor) -> None:
        """Add ``other``'s sums, whose tokens were shifted by ``dx, dy`` more than this one's (``x_self = x_other
        - dx``): re-centred exactly, since the sums of a shifted variable follow from those of the original."""
        dx, dy = dx.double().to(self.sx.device), dy.double().to(self.sx.device)
        n, sx, sy = other.n, other.sx.to(self.sx.device), other.sy.to(self.sx.device)
        self.xx += other.xx.to(self.xx.device) - torch.outer(dx, sx) - torch.outer(sx, dx) + n * torch.outer(dx, dx)
        self.xy += other.xy.to(self.xy.device) - torch.outer(dx, sy) - torch.outer(sx, dy) + n * torch.outer(dx, dy)
        self.yy += other.yy.to(self.yy.device) - 2 * dy * sy + n * dy.pow(2)
        self.sx += sx - n * dx
        self.sy += sy - n * dy
        self.n += n

    def sse(self, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
        """Per-target sum of squared residuals of ``y ~ x @ coef + intercept`` on these tokens."""
        xc = self.xx @ coef
        return (
            self.yy
            - 2 * (coef * self.xy).sum(0)
            - 2 * intercept * self.sy
            + (coef * xc).sum(0)
            + 2 * intercept * (self.sx @ coef)
            + self.n * intercept.pow(2)
        )

    def sst(self) -> torch.Tensor:
        """Per-target total sum of squares about the mean."""
        return self.yy - self.sy.pow(2) / max(self.n, 1)


class LinearErrorStats:
    """Accumulates held-in and held-out sufficient statistics for the linear error map."""

    def __init__(self, d_in: int, device: torch.device | str = "cpu", paper_positions: tuple[int, int] | None = None):
        self.d_in = d_in
        self.paper_positions = None if paper_positions is None else list(paper_positions)
        self.fit_part = Moments(d_in, d_in + 1, device)
        self.score_part = Moments(d_in, d_in + 1, device)
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        # the paper's quantities: targets z = [e, ||e||^2] on the random token split (``token_split``)
        self.split_fit = Moments(d_in, d_in + 1, device)
        self.split_score = Moments(d_in, d_in + 1, device)
        self.shift_z: torch.Tensor | None = None

    def update(self, x: torch.Tensor, e: torch.Tensor, heldout: torch.Tensor, context_ids: torch.Tensor,
               positions: torch.Tensor) -> None:
        """Add tokens ``x, e [n, d_in]``; ``heldout [n]`` bool marks scoring tokens; ``context_ids, positions [n]``
        say where each token is (the paper-style fit's random token split and position filter)."""
        x, e = x.float(), e.float()
        y = torch.cat([e, e.norm(dim=-1, keepdim=True)], 1)
        z = torch.cat([e, e.pow(2).sum(-1, keepdim=True)], 1)
        if self.shift_x is None or self.shift_y is None or self.shift_z is None:  # all set by the first update
            self.shift_x, self.shift_y, self.shift_z = x.mean(0), y.mean(0), z.mean(0)
        held = token_split(context_ids, positions).to(x.device)
        x, y, z = x - self.shift_x, y - self.shift_y, z - self.shift_z
        self.fit_part.add(x[~heldout], y[~heldout])
        self.score_part.add(x[heldout], y[heldout])
        kept = torch.ones_like(held)
        if self.paper_positions is not None:
            pos = positions.to(x.device)
            kept = (pos >= self.paper_positions[0]) & (pos <= self.paper_positions[1])
        self.split_fit.add(x[kept & ~held], z[kept & ~held])
        self.split_score.add(x[kept & held], z[kept & held])

    def merge(self, other: LinearErrorStats) -> None:
        """Add another state over disjoint tokens (its sums re-centred on this state's shift): the state of all."""
        if getattr(other, "paper_positions", None) != getattr(self, "paper_positions", None):
            raise ValueError(f"cannot merge dark-matter states of different paper_positions ({self.paper_positions} "
                             f"and {other.paper_positions})")
        if other.shift_x is None or other.shift_y is None or other.shift_z is None:
            return
        if self.shift_x is None or self.shift_y is None or self.shift_z is None:
            self.shift_x, self.shift_y, self.shift_z = other.shift_x.clone(), other.shift_y.clone(), other.shift_z.clone()
        # other's sums are of (v - other.shift); this state's of (v - self.shift) = (v - other.shift) - d
        dx = (self.shift_x - other.shift_x.to(self.shift_x.device)).double()
        dy = (self.shift_y - other.shift_y.to(self.shift_y.device)).double()
        dz = (self.shift_z - other.shift_z.to(self.shift_z.device)).double()
        self.fit_part.merge(other.fit_part, dx, dy)
        self.score_part.merge(other.score_part, dx, dy)
        self.split_fit.merge(other.split_fit, dx, dz)
        self.split_score.merge(other.split_score, dx, dz)

    def fit(self, ridge: float = 1e-6) -> LinearErrorMap:
        """Ridge fit on held-in tokens (``ridge`` relative to the mean feature variance), scored on held-out."""
        m, d = self.fit_part, self.d_in
        n = max(m.n, 1)
        mu_x, mu_y = m.sx / n, m.sy / n
        cxx = m.xx / n - torch.outer(mu_x, mu_x)
        cxy = m.xy / n - torch.outer(mu_x, mu_y)
        lam = ridge * float(cxx.diagonal().mean().clamp_min(1e-12))
        coef = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype, device=cxx.device), cxy)
        intercept = mu_y - mu_x @ coef

        def r2(part: Moments) -> tuple[float, float]:
            if part.n < 2:
                return float("nan"), float("nan")
            sse, sst = part.sse(coef, intercept), part.sst()
            return float(1 - sse[:d].sum() / sst[:d].sum()), float(1 - sse[d] / sst[d])

        out_err, out_norm = r2(self.score_part)
        in_err, in_norm = r2(self.fit_part)
        # undo the shift: y + sy = (x + sx - sx) @ coef + intercept + sy
        assert self.shift_x is not None and self.shift_y is not None, "fit() needs at least one update()"
        sx, sy = self.shift_x.double(), self.shift_y.double()
        full_intercept = intercept + sy - sx @ coef
        return LinearErrorMap(
            W=coef[:, :d].float().contiguous(),
            b=full_intercept[:d].float(),
            w_norm=coef[:, d].float().contiguous(),
            b_norm=float(full_intercept[d]),
            metrics={
                "heldout_error_r2": out_err,
                "heldout_norm_r2": out_norm,
                "train_error_r2": in_err,
                "train_norm_r2": in_norm,
                "n_train_tokens": int(m.n),
                "n_heldout_tokens": int(self.score_part.n),
                "ridge": lam,
                **self.paper_metrics(),
            },
        )

    def paper_metrics(self) -> dict[str, Any]:
        """The paper's quantities: ``e ~ x @ W`` and ``||e||^2 ~ x @ w``, least squares without bias (minimum-norm
        where singular) on the ``token_split`` fitting tokens; R^2 on the held-out ones, for ``e`` averaged over
        its dimensions (``1 - SSE_i / SST_i``, SST about the held-out mean; dimensions without variance left out)."""
        d, m = self.d_in, self.split_fit
        out = {"paper_heldout_fraction": PAPER_HELDOUT_FRACTION, "paper_split_seed": PAPER_SPLIT_SEED,
               "paper_positions": getattr(self, "paper_positions", None),
               "paper_n_train_tokens": int(m.n), "paper_n_heldout_tokens": int(self.split_score.n)}
        names = ("paper_heldout_error_r2_mean_dim", "paper_heldout_norm_sq_r2", "paper_train_error_r2_mean_dim",
                 "paper_train_norm_sq_r2")
        if self.shift_x is None or self.shift_z is None or m.n == 0:
            return {**out, **dict.fromkeys(names, float("nan"))}
        sx, sz = self.shift_x.double(), self.shift_z.double()
        raw = Moments(d, d + 1, m.xx.device)
        raw.merge(m, -sx, -sz)  # the sums of the unshifted tokens: a fit without bias needs X^T X, X^T Z about 0
        coef = torch.linalg.lstsq(raw.xx.cpu(), raw.xy.cpu(), driver="gelsd").solution.to(m.xx.device)
        # on the shifted sums, z - x @ coef = z' - x' @ coef - (sx @ coef - sz)
        intercept = sx @ coef - sz

        def r2(part: Moments) -> tuple[float, float]:
            if part.n < 2:
                return float("nan"), float("nan")
            sse, sst = part.sse(coef, intercept), part.sst()
            varies = sst[:d] > 0
            err = float((1 - sse[:d][varies] / sst[:d][varies]).mean()) if varies.any() else float("nan")
            return err, float(1 - sse[d] / sst[d]) if sst[d] > 0 else float("nan")

        return {**out, **dict(zip(names, (*r2(self.split_score), *r2(m)), strict=True))}
