"""Labelled concepts and the per-concept activation densities of units, after Fereidouni et al. ("Evaluating Sparse
Autoencoders for Monosemantic Representation"; MultifacetedNLP/SAEMonosemanticity): shared by concept
separability (``engine.eval.separability``) and APP steering (``engine.live.app``).

A unit *records* a value on a text where it is active (a latent: code > 0; a neuron: always). A concept is
*active* for a unit that recorded values on more than ``share`` of the concept's texts and on two or more. Each
active concept's recorded values give a Gaussian KDE with Scott's bandwidth (``std (ddof 1) * n^(-1/5)``, as
``scipy.stats.gaussian_kde``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class Concepts(NamedTuple):
    texts: list[str]
    labels: np.ndarray
    """``[n]`` int: index into ``names``."""
    names: list[str]


def read_concepts(path: str | Path) -> Concepts:
    """The labelled texts of a JSONL file of ``{"text", "label"}`` lines (labels in order of first appearance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no concepts file at {path}: pass --concepts with a JSONL of {{\"text\", \"label\"}} lines")
    texts, raw = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("label"), str | int):
            raise ValueError(f"{path} line {number} is not an object with a string \"text\" and a \"label\"")
        texts.append(item["text"])
        raw.append(str(item["label"]))
    names = list(dict.fromkeys(raw))
    if len(names) < 2:
        raise ValueError(f"{path} has {len(names)} label(s): concepts need two or more")
    return Concepts(texts, np.array([names.index(r) for r in raw]), names)


def scott_bandwidth(values: np.ndarray) -> float:
    """``std (ddof 1) * n^(-1/5)``; 0 for fewer than two values or no spread."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) * len(values) ** (-1 / 5)) if len(values) > 1 else 0.0


def kde_on_grid(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE of 1-D ``values`` at the points ``grid`` (Scott's bandwidth), or None when the values are all
    equal (no bandwidth: scipy raises there)."""
    values = np.asarray(values, dtype=np.float64)
    bandwidth = scott_bandwidth(values)
    if not bandwidth > 0:
        return None
    z = (np.asarray(grid, dtype=np.float64)[:, None] - values[None, :]) / bandwidth
    return np.exp(-0.5 * z * z).sum(1) / (len(values) * bandwidth * math.sqrt(2 * math.pi))


def active_concepts(recorded: np.ndarray, labels: np.ndarray, n_concepts: int, share: float) -> np.ndarray:
    """``[units, concepts]`` bool: concept active for the unit (recorded on more than ``share`` of its texts and on
    two or more), from ``recorded [n, units]`` bool and ``labels [n]``."""
    counts = np.stack([recorded[labels == c].sum(0) for c in range(n_concepts)], 1)
    sizes = np.bincount(labels, minlength=n_concepts)
    return (counts > share * sizes[None, :]) & (counts > 1)


TAIL_STDS = 2.5
"""APP leaves a value alone beyond this many standard deviations of the concept's values (the reference's tail)."""


@dataclass(frozen=True)
class ConceptDensities:
    """The per-concept KDEs of the latents one concept is active for (APP steering's fitted densities)."""

    concept: int
    """The concept to suppress (index into the concepts' names)."""
    exclusive: list[int]
    """Latents active for the concept only: APP sets them to 0."""
    shared: list[int]
    """Latents active for the concept and for another: APP multiplies them by ``1 - P(concept | a)``."""
    points: torch.Tensor
    """``[len(shared), n_concepts, n_max]`` float64: each concept's recorded values (padding: NaN)."""
    bandwidth: torch.Tensor
    """``[len(shared), n_concepts]`` float64 (0: no density for that concept, inactive or without spread)."""
    mean: torch.Tensor
    """``[len(shared)]``: mean of the concept's own values (the tail rule)."""
    std: torch.Tensor
    """``[len(shared)]``: their standard deviation (ddof 1)."""

    @classmethod
    def fit(cls, values: np.ndarray, recorded: np.ndarray, labels: np.ndarray, n_concepts: int, concept: int,
            share: float = 0.1) -> ConceptDensities:
        """Fit from latent values ``[n_texts, d_sae]`` on labelled texts (``recorded``: where each latent fired)."""
        active = active_concepts(recorded, labels, n_concepts, share)
        mine = np.nonzero(active[:, concept])[0]
        others = active[mine].sum(1) > 1
        exclusive, shared = mine[~others].tolist(), mine[others].tolist()
        per = [[values[recorded[:, u] & (labels == c), u] if active[u, c] else np.zeros(0)
                for c in range(n_concepts)] for u in shared]
        n_max = max([len(v) for row in per for v in row], default=1)
        points = torch.full((len(shared), n_concepts, n_max), float("nan"), dtype=torch.float64)
        bandwidth = torch.zeros(len(shared), n_concepts, dtype=torch.float64)
        for i, row in enumerate(per):
            for c, v in enumerate(row):
                points[i, c, : len(v)] = torch.from_numpy(np.asarray(v, dtype=np.float64))
                bandwidth[i, c] = scott_bandwidth(v)
        own = [np.asarray(row[concept], dtype=np.float64) for row in per]
        return cls(concept, exclusive, shared, points, bandwidth,
                   torch.tensor([v.mean() for v in own], dtype=torch.float64),
                   torch.tensor([v.std(ddof=1) for v in own], dtype=torch.float64))

    def densities(self, a: torch.Tensor) -> torch.Tensor:
        """``[..., len(shared), n_concepts]``: each concept's KDE of each shared latent at its value ``a [...,
        len(shared)]`` (0 for a concept without a density)."""
        h = self.bandwidth.to(a.device)
        pts = self.points.to(a.device)
        z = (a.double()[..., None, None] - pts) / h.clamp_min(1e-300)[..., None]
        kernel = torch.nan_to_num(torch.exp(-0.5 * z * z), nan=0.0)  # padding contributes nothing
        n = (~torch.isnan(pts)).sum(-1).clamp_min(1)
        density = kernel.sum(-1) / (n * h.clamp_min(1e-300) * math.sqrt(2 * math.pi))
        return torch.where(h > 0, density, torch.zeros_like(density))

    def posterior(self, a: torch.Tensor) -> torch.Tensor:
        """``P(concept | a)`` per shared latent, equal priors: ``p_c(a) / (sum_j p_j(a) + 1e-12)``."""
        dens = self.densities(a)
        return dens[..., self.concept] / (dens.sum(-1) + 1e-12)

    def multipliers(self, a: torch.Tensor) -> torch.Tensor:
        """APP's factor per shared latent at values ``a [..., len(shared)]``: ``1 - P(concept | a)``, or 1 where ``a``
        lies beyond ``TAIL_STDS`` standard deviations of the concept's own values."""
        mean, std = self.mean.to(a.device), self.std.to(a.device)
        tail = (a.double() < mean - TAIL_STDS * std) | (a.double() > mean + TAIL_STDS * std)
        return torch.where(tail, torch.ones_like(mean), 1 - self.posterior(a))
