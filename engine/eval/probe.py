"""Linear probes: L2-regularised logistic regression (scikit-learn's objective, solved by Newton's method)
and SAEBench's rule for choosing k latents (largest absolute difference of class means).

The objective is scikit-learn's ``LogisticRegression(penalty="l2", C=C)``:
``0.5 * ||w||^2 + C * sum_i s_i * log(1 + exp(-t_i * (x_i . w + b)))`` with ``t_i = +-1``, sample weights ``s_i``
(``balanced_weights`` is its ``class_weight="balanced"``) and the intercept ``b`` not penalised. It is strictly
convex, so any exact solver reaches the same probe; the tests check it against scikit-learn's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class LogisticProbe(NamedTuple):
    """A fitted binary probe: ``decision(x) = x @ coef + intercept``, class 1 where it is > 0."""

    coef: np.ndarray
    intercept: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision(x) > 0).astype(np.int64)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights ``n / (2 * n_class)``: both classes weigh the same in total."""
    y = np.asarray(y)
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        return np.ones(len(y))
    return np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, C: float = 1.0, sample_weight: np.ndarray | None = None,
                 max_iter: int = 100, tol: float = 1e-9) -> LogisticProbe:
    """The L2-regularised logistic regression of ``y`` (0/1) on ``x [n, d]`` (see the module docstring), by
    Newton's method with a backtracking line search, in float64 torch (whose threads wait passively: OpenBLAS'
    spinning threads made SciPy's L-BFGS 10-80x slower on a shared CPU). Stops when every gradient entry is
    below ``tol`` times the total sample weight."""
    xs = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    t = torch.where(torch.as_tensor(np.asarray(y)) == 1, 1.0, -1.0).to(torch.float64)
    if xs.ndim != 2 or len(xs) != len(t):
        raise ValueError(f"x must be [n, d] with one label per row, got {tuple(xs.shape)} and {tuple(t.shape)}")
    if len(t.unique()) < 2:
        raise ValueError("a probe needs examples of both classes")
    s = torch.ones(len(t), dtype=torch.float64) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)
    s = C * s
    d = xs.shape[1]
    x1 = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)  # the intercept as a last, unpenalised column
    reg = torch.ones(d + 1, dtype=torch.float64)
    reg[d] = 0.0

    def objective(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        margin = t * (x1 @ theta)
        return float(0.5 * (reg * theta) @ theta + s @ F.softplus(-margin)), margin

    theta = torch.zeros(d + 1, dtype=torch.float64)
    loss, margin = objective(theta)
    limit = tol * max(1.0, float(s.sum()))
    for _ in range(max_iter):
        p = torch.sigmoid(-margin)
        grad = reg * theta - x1.T @ (s * t * p)
        if float(grad.abs().max()) < limit:
            break
        hess = (x1 * (s * p * (1 - p))[:, None]).T @ x1
        hess.diagonal().add_(reg + 1e-12)
        step = torch.linalg.solve(hess, grad)
        size, decrease = 1.0, float(grad @ step)
        while True:
            new_loss, new_margin = objective(theta - size * step)
            if new_loss <= loss - 1e-4 * size * decrease or size < 1e-10:
                break
            size *= 0.5
        theta, loss, margin = theta - size * step, new_loss, new_margin
    coef = theta[:d].numpy().copy()
    return LogisticProbe(coef, float(theta[d]))


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """SAEBench's latent choice: the ``k`` columns with the largest ``|mean(x | y=1) - mean(x | y=0)|``
    (ties to the lower index)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def accuracy(probe: LogisticProbe, x: np.ndarray, y: np.ndarray) -> float:
    return float((probe.predict(x) == np.asarray(y)).mean())


def f1(pred: np.ndarray, y: np.ndarray) -> float:
    """F1 of the positive class (0 when there are no true positives)."""
    pred, y = np.asarray(pred).astype(bool), np.asarray(y).astype(bool)
    tp = int((pred & y).sum())
    return 0.0 if tp == 0 else 2 * tp / (int(pred.sum()) + int(y.sum()))
