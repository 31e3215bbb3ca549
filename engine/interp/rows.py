"""What ``InterpStore`` returns: one explanation with its scores, and per-explainer summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

BASELINE_PREFIX = "baseline:"
"""Explainer names of the top-token baselines start with this."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Explanation:
    """One explainer's explanation of one latent with its scores (``None``: the scorer's score is undefined)."""

    feature_id: int
    explainer: str
    prompt_version: str
    text: str | None
    """None when the explainer failed or the latent had no examples (see ``status``, ``reason``)."""
    status: str
    """``ok``, ``failed`` or ``skipped``."""
    reason: str
    created_at: datetime | None
    scores: dict[str, float | None] = field(default_factory=dict)
    """Score per scorer (detection, fuzzing, embedding) that ran."""
    n_examples: dict[str, int] = field(default_factory=dict)
    mean_score: float | None = None
    """Mean of the defined scores of the explanation (the intruder score, which is the latent's, left out)."""
    rank: int = 1
    """1 for the best-ranked explanation of this latent, baselines included."""
    rank_scorer: str | None = None
    """The score this latent's explanations are ranked by: the first of detection, fuzzing, embedding that every
    usable non-baseline explanation of it has (None: none is shared; then scored before unscored, newest first)."""
    rank_score: float | None = None

    @property
    def is_baseline(self) -> bool:
        return self.explainer.startswith(BASELINE_PREFIX)


@dataclass(frozen=True)
class ExplainerSummary:
    explainer: str
    prompt_version: str
    n: int
    n_ok: int
    n_failed: int
    n_skipped: int
    mean_scores: dict[str, float | None]
    """Mean score per scorer over the latents where it is defined."""
    n_scored: dict[str, int]
    mean_score: float | None
    """Mean over latents of each explanation's mean score."""
    is_baseline: bool


@dataclass(frozen=True)
class InterpSummary:
    n_explanations: int
    """Rows of explanations (every explainer and prompt version, failed and skipped included)."""
    n_latents: int
    """Latents with at least one usable (``ok``) explanation, baselines included."""
    n_best: int
    """Latents with a usable non-baseline explanation (what ``best`` and search cover)."""
    n_scores: int
    explainers: tuple[ExplainerSummary, ...]
    embedding_models: dict[str, int]


def created(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=int(us))


def explanation(row: tuple) -> Explanation:
    fid, who, version, text, status, reason, created_us, scored, mean, rank, rank_scorer, rank_score = row
    scored = sorted(scored or [], key=lambda s: s["scorer"])
    return Explanation(int(fid), who, version, text, status, reason or "", created(created_us),
                       {s["scorer"]: s["score"] for s in scored}, {s["scorer"]: int(s["n"] or 0) for s in scored},
                       None if mean is None else float(mean), int(rank), rank_scorer,
                       None if rank_score is None else float(rank_score))
