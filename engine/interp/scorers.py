"""delphi-style scores of an explanation on held-out contexts the explainer did not see (docs/explanations.md).

* **detection**: the scorer model reads the explanation and one excerpt and says whether the latent is active
  in it; activating excerpts (held-out top and quantile-sampled examples) against non-activating ones
  (contexts where the latent never fires). Score: balanced accuracy of ``P(1) > 0.5``.
* **fuzzing**: activating excerpts with the latent's active tokens marked (``<<...>>``) against non-activating
  excerpts with as many tokens marked at random; the model says whether the marks fit the explanation.
  Score: balanced accuracy.
* **embedding**: a sentence-embedding model scores each excerpt by its cosine to the explanation. Score: AUROC of
  activating against non-activating excerpts.

Each score also records the AUROC of the classifier probabilities and, per excerpt, its context, label and
prediction (``details``), so the app can show which contexts the scorer got wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import prompts
from .backends import ChatBackend, SentenceEmbedder

SCORERS = ("detection", "fuzzing", "embedding")


@dataclass(frozen=True)
class Excerpt:
    """One held-out context window shown to a scorer."""

    context_id: int
    tokens: list[str]
    acts: list[float]
    """Activation per token (zeros for a non-activating excerpt)."""
    activating: bool
    start: int = -1
    """Position of the window's first token in its context (-1: unknown)."""

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class Score:
    scorer: str
    score: float
    n_examples: int
    details: dict = field(default_factory=dict)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean of the true-positive and true-negative rates (NaN when a class is missing)."""
    labels, predictions = np.asarray(labels, bool), np.asarray(predictions, bool)
    if labels.all() or not labels.any():
        return math.nan
    tpr = (predictions & labels).sum() / labels.sum()
    tnr = (~predictions & ~labels).sum() / (~labels).sum()
    return float((tpr + tnr) / 2)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def fuzz_marks(excerpt: Excerpt, n_random: int, rng: np.random.Generator, threshold: float = 0.0) -> list[bool]:
    """Correct marks for an activating excerpt (tokens above ``threshold`` x its max), else ``n_random`` random ones."""
    acts = np.asarray(excerpt.acts, np.float64)
    if excerpt.activating:
        return list(acts > max(threshold * acts.max(), 0.0))
    marks = np.zeros(len(acts), bool)
    marks[rng.choice(len(acts), size=min(n_random, len(acts)), replace=False)] = True
    return list(marks)


def _windows(excerpts: list[Excerpt]) -> list[list[int]]:
    """``[start, end)`` of each excerpt in its context, so the app can show the excerpts a scorer got wrong."""
    return [[e.start, e.start + len(e.tokens)] for e in excerpts]


def _classifier(scorer: str, labels: np.ndarray, probs: list[float], excerpts: list[Excerpt]) -> Score:
    p = np.asarray(probs, np.float64)
    predictions = p > 0.5
    details = {
        "auroc": auroc(labels, p),
        "context_ids": [e.context_id for e in excerpts],
        "windows": _windows(excerpts),
        "labels": labels.astype(int).tolist(),
        "probabilities": [round(float(x), 4) for x in p],
        "prompt_version": prompts.SCORE_VERSION,
    }
    return Score(scorer, balanced_accuracy(labels, predictions), len(excerpts), details)


def detection(backend: ChatBackend, explanation: str, excerpts: list[Excerpt]) -> Score:
    convs = [prompts.detection_messages(explanation, e.text) for e in excerpts]
    labels = np.array([e.activating for e in excerpts])
    return _classifier("detection", labels, backend.yes_probability(convs), excerpts)


def fuzzing(backend: ChatBackend, explanation: str, excerpts: list[Excerpt], seed: int = 0) -> Score:
    rng = np.random.default_rng(seed)
    active = [e for e in excerpts if e.activating]
    n_random = math.ceil(np.mean([sum(a > 0 for a in e.acts) for e in active])) if active else 1
    marked = [prompts.mark(e.tokens, fuzz_marks(e, n_random, rng)) for e in excerpts]
    convs = [prompts.fuzzing_messages(explanation, m) for m in marked]
    labels = np.array([e.activating for e in excerpts])
    return _classifier("fuzzing", labels, backend.yes_probability(convs), excerpts)


def embedding(embedder: SentenceEmbedder, explanation: str, excerpts: list[Excerpt],
              explanation_vector: np.ndarray | None = None) -> Score:
    query = explanation_vector if explanation_vector is not None else embedder.encode([explanation])[0]
    vectors = embedder.encode([e.text for e in excerpts])
    sims = vectors @ query
    labels = np.array([e.activating for e in excerpts])
    details = {"context_ids": [e.context_id for e in excerpts], "windows": _windows(excerpts),
               "labels": labels.astype(int).tolist(),
               "similarities": [round(float(s), 4) for s in sims]}
    return Score("embedding", auroc(labels, sims), len(excerpts), details)


# --- what a score row's details say, per excerpt (the app shows where a scorer went wrong) ---------------------
@dataclass(frozen=True)
class ExcerptResult:
    """How a scorer did on one held-out excerpt."""

    context_id: int
    activating: bool
    value: float | None
    """The judge's P(1)/(P(0)+P(1)) (detection, fuzzing) or cosine(explanation, excerpt) (embedding)."""
    predicted: bool | None
    """``value > 0.5`` for detection and fuzzing; None for embedding (a ranking, no threshold)."""
    misordered: int
    """Excerpts of the other class ranked on the wrong side of this one (strictly); AUROC = 1 - pairs / (P * N)."""
    wrong: bool
    """Detection/fuzzing: the prediction differs from the label. Embedding: ``misordered > 0`` (an activating
    excerpt ranked below a non-activating one, or a non-activating one above an activating one)."""
    window: tuple[int, int] | None = None
    """``[start, end)`` of the excerpt in its context (None: scored before windows were recorded)."""


@dataclass(frozen=True)
class ScoreDetail:
    """One scorer's result on one explanation, with its per-excerpt details parsed."""

    feature_id: int
    explainer: str
    prompt_version: str
    scorer: str
    score: float | None
    n_examples: int
    auroc: float | None
    """AUROC of the judge's probabilities (detection, fuzzing) or of the similarities (embedding)."""
    excerpts: tuple[ExcerptResult, ...]

    @property
    def wrong(self) -> tuple[ExcerptResult, ...]:
        return tuple(e for e in self.excerpts if e.wrong)

    @property
    def missed(self) -> tuple[ExcerptResult, ...]:
        """Activating excerpts the scorer got wrong (false negatives, or ranked below a non-activating one)."""
        return tuple(e for e in self.excerpts if e.wrong and e.activating)

    @property
    def false_alarms(self) -> tuple[ExcerptResult, ...]:
        """Non-activating excerpts the scorer got wrong."""
        return tuple(e for e in self.excerpts if e.wrong and not e.activating)


def _misordered(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per excerpt: how many excerpts of the other class sit strictly on the wrong side of it."""
    pos, neg = values[labels], values[~labels]
    out = np.zeros(len(values), np.int64)
    out[labels] = (values[labels][:, None] < neg[None, :]).sum(1)
    out[~labels] = (values[~labels][:, None] > pos[None, :]).sum(1)
    return out


def parse_details(scorer: str, details: str | dict | None) -> tuple[float | None, tuple[ExcerptResult, ...]]:
    """(auroc, per-excerpt results) from a scores row's ``details`` JSON (see ``engine.interp.scorers``)."""
    d = json.loads(details) if isinstance(details, str) else (details or {})
    ids = d.get("context_ids") or []
    labels = np.array([bool(x) for x in d.get("labels") or []], bool)
    raw = (d.get("similarities") if "similarities" in d else d.get("probabilities")) or []
    if not (len(ids) == len(labels) == len(raw)):
        return d.get("auroc"), ()
    values = np.array([np.nan if v is None else float(v) for v in raw], np.float64)
    windows = d.get("windows") or []
    if len(windows) != len(ids):
        windows = [None] * len(ids)
    finite = np.isfinite(values)
    ranked = np.where(finite, values, -np.inf)
    misordered = _misordered(labels, ranked)
    out = []
    for i, cid in enumerate(ids):
        value = float(values[i]) if finite[i] else None
        if scorer == "embedding":
            predicted, wrong = None, bool(misordered[i] > 0)
        else:
            predicted = bool(value is not None and value > 0.5)
            wrong = predicted != bool(labels[i])
        window = windows[i]
        span = (int(window[0]), int(window[1])) if window and len(window) == 2 and int(window[0]) >= 0 else None
        out.append(ExcerptResult(int(cid), bool(labels[i]), value, predicted, int(misordered[i]), wrong, span))
    auc = d.get("auroc")
    if auc is None and scorer == "embedding" and labels.any() and (~labels).any():
        auc = auroc(labels, ranked)
    return (None if auc is None else float(auc)), tuple(out)
