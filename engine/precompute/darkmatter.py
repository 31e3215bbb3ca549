"""SAE dark matter: a linear map from the activation ``x`` to the SAE error ``e = x - x_hat``, in one pass.

Following "Decomposing the Dark Matter of Sparse Autoencoders" (Engels et al.), we fit ``e ~ x @ W + b``
(ridge least squares) and a scalar probe ``||e|| ~ x @ w + c``. Only sufficient statistics are kept:
``X^T X``, ``X^T [E, |E|]``, sums and sums of squares, separately for held-in tokens (fitting) and
held-out tokens (scoring), so both fits and their held-out R^2 come in closed form after a single pass.

Numerics: per-batch products run in float32 on data shifted by a fixed point (the first batch's mean),
which keeps the statistics well conditioned; running totals are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    metrics: dict[str, float]
    """``heldout_error_r2`` (fraction of the held-out error variance the map predicts), ``heldout_norm_r2``,
    the same on held-in tokens, token counts and the ridge used."""

    def split(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearly predictable and nonlinear parts of errors ``e [n, d_in]`` of activations ``x [n, d_in]``."""
        linear = x.float() @ self.W.to(x.device) + self.b.to(x.device)
        return linear, e.float() - linear


class _Moments:
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

    def merge(self, other: _Moments, dx: torch.Tensor, dy: torch.Tensor) -> None:
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

    def __init__(self, d_in: int, device: torch.device | str = "cpu"):
        self.d_in = d_in
        self.fit_part = _Moments(d_in, d_in + 1, device)
        self.score_part = _Moments(d_in, d_in + 1, device)
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None

    def update(self, x: torch.Tensor, e: torch.Tensor, heldout: torch.Tensor) -> None:
        """Add tokens ``x, e [n, d_in]``; ``heldout [n]`` bool marks scoring tokens."""
        x, e = x.float(), e.float()
        y = torch.cat([e, e.norm(dim=-1, keepdim=True)], 1)
        if self.shift_x is None or self.shift_y is None:  # both are set by the first update
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
        x, y = x - self.shift_x, y - self.shift_y
        self.fit_part.add(x[~heldout], y[~heldout])
        self.score_part.add(x[heldout], y[heldout])

    def merge(self, other: LinearErrorStats) -> None:
        """Add another state over disjoint tokens (its sums re-centred on this state's shift): the state of all."""
        if other.shift_x is None or other.shift_y is None:
            return
        if self.shift_x is None or self.shift_y is None:
            self.shift_x, self.shift_y = other.shift_x.clone(), other.shift_y.clone()
        # other's sums are of (v - other.shift); this state's of (v - self.shift) = (v - other.shift) - d
        dx = (self.shift_x - other.shift_x.to(self.shift_x.device)).double()
        dy = (self.shift_y - other.shift_y.to(self.shift_y.device)).double()
        self.fit_part.merge(other.fit_part, dx, dy)
        self.score_part.merge(other.score_part, dx, dy)

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

        def r2(part: _Moments) -> tuple[float, float]:
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
            },
        )
