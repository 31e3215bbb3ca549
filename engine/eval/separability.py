"""Concept separability of units (SAE latents, and the model's own neurons at the hook), after "Evaluating Sparse
Autoencoders for Monosemantic Representation" (Fereidouni et al.; its repository MultifacetedNLP/SAEMonosemanticity,
``PlotAndEvaluate.py`` and ``utility.generalized_js_distance``).

Each labelled text (a JSONL file of ``{"text", "label"}``) gives one activation per unit: the unit's value at the
text's last counted token (``pool = "last"``, the reference's ``last_token``) or its maximum over the text's
counted tokens (``"max"``, its ``all_tokens_max``); counted: not position 0, not special, not a
massive-activation token (as sparse probing counts them). A latent *records* a value on a text where it fires (code > 0);
a neuron records every value. For each unit and concept, the concept is *active* when the unit recorded values
on more than ``active_share`` (0.1) of the concept's texts, and on at least two. Then per unit:

- no active concept: left out; one: score 1 (monosemantic);
- two or more (*polysemantic*): a Gaussian KDE (Scott's bandwidth, as ``scipy.stats.gaussian_kde``) of each
  active concept's recorded values, evaluated on ``grid`` (1000) points spanning every value the unit recorded,
  and the generalized Jensen-Shannon distance of those densities: each plus 1e-10 and normalised to sum 1,
  ``JS = H(mean_c p_c) - mean_c H(p_c)`` (bits), score ``sqrt(JS) / sqrt(log2 k)`` for ``k`` active concepts
  (1: the concepts' activation values never overlap; 0: identical distributions).

Summaries: the mean score over scored units, over polysemantic ones, and the polysemantic share. Departures from
the reference: every labelled text counts (the reference keeps only texts its model classified correctly with a
prompt); a concept whose recorded values are all equal has no KDE (scipy raises there, and the reference skips
the concept), and a unit left with fewer than two densities is not scored (counted as ``n_degenerate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..analysis.concepts import active_concepts, kde_on_grid, read_concepts
from ..data.text_values import unit_values
from ..model.loading import LoadedModel
from ..saes import SAE
from .sparse_probing import Row

EPSILON = 1e-10
"""Added to each density before normalising (the reference's ``epsilon``)."""
POOLS = ("last", "max")


@dataclass
class SeparabilityConfig:
    """Settings of the concept-separability part of ``saescope evaluate``."""

    concepts: str | None = None
    """A JSONL file of labelled texts, one ``{"text": ..., "label": ...}`` per line (the demo's:
    data/concepts/python-docs-manuals.jsonl)."""
    pool: str = "last"
    """A text's value of a unit: at its last counted token (last) or the maximum over its counted tokens (max)."""
    active_share: float = 0.1
    """A concept is active for a unit that fires on more than this share of its texts (and on two or more)."""
    grid: int = 1000
    """Points of the shared grid the densities are compared on."""
    max_tokens: int = 128
    """Tokens per text (longer texts are cut)."""

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not 0 <= self.active_share < 1:
            raise ValueError(f"active_share must be in [0, 1), got {self.active_share}")
        if self.grid < 2 or self.max_tokens < 1:
            raise ValueError(f"grid must be >= 2 and max_tokens >= 1, got {self.grid} and {self.max_tokens}")


class UnitScores(NamedTuple):
    score: np.ndarray
    """``[units]`` float64: the separability (NaN: not scored, no active concept or too few densities)."""
    n_active: np.ndarray
    """``[units]`` int: active concepts per unit."""


def js_distance(densities: Sequence[np.ndarray]) -> float:
    """The generalized Jensen-Shannon distance of ``k >= 2`` densities on one grid, in [0, 1] (module docstring)."""
    p = np.stack([np.asarray(d, dtype=np.float64) + EPSILON for d in densities])
    p /= p.sum(1, keepdims=True)

    def entropy(q: np.ndarray) -> np.ndarray:
        return -(q * np.log2(q)).sum(-1)

    js = float(entropy(p.mean(0)) - entropy(p).mean())
    return math.sqrt(max(js, 0.0)) / math.sqrt(math.log2(len(p)))


def unit_densities(values: np.ndarray, recorded: np.ndarray, labels: np.ndarray, concepts: np.ndarray,
                   grid_points: int) -> tuple[np.ndarray, list[int], list[np.ndarray]] | None:
    """One unit's shared grid, the concepts that got a density and those densities (``values, recorded [n]``;
    ``concepts``: its active concepts); None when every recorded value is equal."""
    seen = values[recorded]
    lo, hi = float(seen.min()), float(seen.max())
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, grid_points)
    kept, densities = [], []
    for c in concepts:
        density = kde_on_grid(values[recorded & (labels == c)], grid)
        if density is not None:
            kept.append(int(c))
            densities.append(density)
    return grid, kept, densities


def unit_scores(values: np.ndarray, recorded: np.ndarray, labels: np.ndarray, n_concepts: int,
                share: float = 0.1, grid: int = 1000) -> UnitScores:
    """Each unit's separability (module docstring) from ``values, recorded [n, units]`` and ``labels [n]``."""
    active = active_concepts(recorded, labels, n_concepts, share)
    n_active = active.sum(1)
    score = np.full(values.shape[1], np.nan)
    score[n_active == 1] = 1.0
    for unit in np.nonzero(n_active >= 2)[0]:
        fitted = unit_densities(values[:, unit], recorded[:, unit], labels, np.nonzero(active[unit])[0], grid)
        if fitted is not None and len(fitted[2]) >= 2:
            score[unit] = js_distance(fitted[2])
    return UnitScores(score, n_active)


def summary(scores: UnitScores) -> dict[str, float]:
    """Mean over scored units, over polysemantic ones, their counts and the polysemantic share."""
    scored = ~np.isnan(scores.score)
    poly = scored & (scores.n_active >= 2)
    n_scored = int(scored.sum())
    return {
        "mean_js_all": float(scores.score[scored].mean()) if n_scored else float("nan"),
        "mean_js_polysemantic": float(scores.score[poly].mean()) if poly.any() else float("nan"),
        "polysemantic_fraction": float(poly.sum() / n_scored) if n_scored else float("nan"),
        "n_scored": float(n_scored),
        "n_degenerate": float(((scores.n_active >= 1) & ~scored).sum()),
    }


def separability_rows(lm: LoadedModel, sae: SAE, cfg: SeparabilityConfig, batch_size: int = 16) -> list[Row]:
    """The ``separability`` rows of ``saescope evaluate``: the summaries for the SAE's latents and, with the
    ``neuron_`` prefix, for the model's neurons at the hook; and the per-concept text counts."""
    if cfg.concepts is None:
        raise ValueError("the separability part needs --concepts FILE (a JSONL of {\"text\", \"label\"} lines)")
    concepts = read_concepts(cfg.concepts)
    values = unit_values(lm, sae, concepts.texts, cfg.pool, cfg.max_tokens, batch_size)
    k = len(concepts.names)
    rows: list[Row] = []
    for prefix, x, recorded in (("", values.latents, values.latents > 0),
                                ("neuron_", values.neurons, np.ones(values.neurons.shape, dtype=bool))):
        scores = unit_scores(x, recorded, concepts.labels, k, cfg.active_share, cfg.grid)
        n = x.shape[1]
        rows += [Row("separability", prefix + name, None, None, value, n) for name, value in summary(scores).items()]
    sizes = np.bincount(concepts.labels, minlength=k)
    rows += [Row("separability", "texts", name, None, float(size), int(size))
             for name, size in zip(concepts.names, sizes, strict=True)]
    return rows
