"""delphi-style scores of an explanation on held-out contexts the explainer did not see (docs/explanations.md).

* **detection**: the judge reads the explanation and one excerpt and says whether the latent is active in it;
  activating excerpts (held-out, each with its activation quantile) against non-activating ones (contexts where
  the latent never fires). Score: balanced accuracy of ``P(1) > 0.5``.
* **fuzzing**: activating excerpts with their tokens at >= 0.3 x the excerpt's maximum marked (``<<...>>``) against
  non-activating excerpts with as many marks as an activating excerpt has active tokens (rounded up), one of them
  where the activating excerpts' maximum sits (delphi's settings); the judge says whether the marks fit the
  explanation. Score: balanced accuracy.
* **embedding**: a sentence-embedding model scores each excerpt by its cosine to the explanation. Score: AUROC of
  activating against non-activating excerpts.
* **intruder** (``engine.interp.intruder``): needs no explanation; see there.

A judge's answer that is not a digit it was asked for is a *failed judgement* (``engine.interp.judge``): it is
left out of the score and counted (``failed``, ``failure_rate``). Each score also records the AUROC of the judge's
probabilities, the score per activation quantile (``by_quantile``) and, per excerpt, its context, window,
quantile, label, probability and the judge's ``P(0) + P(1)`` (``mass``), so the app can show what went wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import prompts
from .backends import ChatBackend, SentenceEmbedder
from .judge import Judgement

SCORERS = ("detection", "fuzzing", "embedding", "intruder")
FUZZ_THRESHOLD = 0.3
"""delphi's: a token of an activating excerpt is marked when its activation is >= this x the excerpt's maximum."""
NON_ACTIVATING = -1
"""The quantile recorded for a non-activating excerpt."""


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
    quantile: int = NON_ACTIVATING
    """Activation quantile of an activating excerpt, 0 = the highest (``engine.interp.data``); -1: non-activating."""

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


def by_quantile(scorer: str, labels: np.ndarray, values: np.ndarray, quantiles: np.ndarray) -> dict[str, float]:
    """The score per activation quantile, as delphi reports it: for detection and fuzzing the fraction of a
    quantile's activating excerpts judged active (``P(1) > 0.5``), and under ``"-1"`` the fraction of
    non-activating ones judged inactive; for embedding the AUROC of a quantile's excerpts against every
    non-activating one. Failed judgements (NaN) are left out."""
    labels, values, quantiles = np.asarray(labels, bool), np.asarray(values, np.float64), np.asarray(quantiles)
    ok = np.isfinite(values)
    out: dict[str, float] = {}
    for q in sorted({int(x) for x in quantiles[labels & ok]}):
        mine = labels & ok & (quantiles == q)
        if scorer == "embedding":
            keep = mine | (~labels & ok)
            out[str(q)] = auroc(labels[keep], values[keep])
        else:
            out[str(q)] = float(np.mean(values[mine] > 0.5))
    if scorer != "embedding" and (~labels & ok).any():
        out[str(NON_ACTIVATING)] = float(np.mean(values[~labels & ok] <= 0.5))
    return out


def anchor(excerpts: list[Excerpt]) -> int:
    """Where the activating excerpts' maximum usually sits in its window (the most common position; 0 if none):
    a non-activating excerpt gets a mark there, so the marks' place says nothing (delphi marks the position its
    centred windows put the maximum at)."""
    spots = [int(np.argmax(e.acts)) for e in excerpts if e.activating and len(e.acts)]
    return int(np.bincount(spots).argmax()) if spots else 0


def fuzz_marks(excerpt: Excerpt, n_random: int, rng: np.random.Generator, threshold: float = FUZZ_THRESHOLD,
               at: int = 0) -> list[bool]:
    """An activating excerpt's correct marks (tokens at >= ``threshold`` x its maximum); a non-activating one's
    ``n_random`` marks: position ``at`` (clipped to the excerpt) and the rest at random."""
    acts = np.asarray(excerpt.acts, np.float64)
    if excerpt.activating:
        return list((acts >= threshold * acts.max()) & (acts > 0))
    marks = np.zeros(len(acts), bool)
    n = min(n_random, len(acts))
    if n > 0:
        first = min(max(at, 0), len(acts) - 1)
        marks[first] = True
        others = np.flatnonzero(~marks)
        marks[rng.choice(others, size=n - 1, replace=False)] = True
    return list(marks)


def _windows(excerpts: list[Excerpt]) -> list[list[int]]:
    """``[start, end)`` of each excerpt in its context, so the app can show the excerpts a scorer got wrong."""
    return [[e.start, e.start + len(e.tokens)] for e in excerpts]


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def failure_details(judgements: list[Judgement]) -> dict:
    failed = sum(j.failed for j in judgements)
    return {"failed": failed, "failure_rate": failed / len(judgements) if judgements else None,
            "mass": [_round(j.mass) for j in judgements]}


def _classifier(scorer: str, labels: np.ndarray, judgements: list[Judgement], excerpts: list[Excerpt]) -> Score:
    p = np.array([math.nan if j.failed else j.yes() for j in judgements], np.float64)
    ok = np.isfinite(p)
    quantiles = np.array([e.quantile for e in excerpts], np.int64)
    details = {
        "auroc": auroc(labels[ok], p[ok]),
        "context_ids": [e.context_id for e in excerpts],
        "windows": _windows(excerpts),
        "labels": labels.astype(int).tolist(),
        "quantiles": quantiles.tolist(),
        "probabilities": [_round(x) for x in p],
        **failure_details(judgements),
        "by_quantile": by_quantile(scorer, labels, p, quantiles),
        "prompt_version": prompts.SCORE_VERSION,
    }
    return Score(scorer, balanced_accuracy(labels[ok], p[ok] > 0.5), len(excerpts), details)


def detection(backend: ChatBackend, explanation: str, excerpts: list[Excerpt], budget: int = 0) -> Score:
    convs = [prompts.detection_messages(explanation, e.text) for e in excerpts]
    labels = np.array([e.activating for e in excerpts], bool)
    return _classifier("detection", labels, backend.judge(convs, budget=budget), excerpts)


def fuzzing(backend: ChatBackend, explanation: str, excerpts: list[Excerpt], seed: int = 0, budget: int = 0) -> Score:
    rng = np.random.default_rng(seed)
    active = [e for e in excerpts if e.activating]
    n_random = math.ceil(np.mean([sum(a > 0 for a in e.acts) for e in active])) if active else 1
    at = anchor(excerpts)
    marked = [prompts.mark(e.tokens, fuzz_marks(e, n_random, rng, at=at)) for e in excerpts]
    convs = [prompts.fuzzing_messages(explanation, m) for m in marked]
    labels = np.array([e.activating for e in excerpts], bool)
    return _classifier("fuzzing", labels, backend.judge(convs, budget=budget), excerpts)


def embedding(embedder: SentenceEmbedder, explanation: str, excerpts: list[Excerpt],
              explanation_vector: np.ndarray | None = None) -> Score:
    query = explanation_vector if explanation_vector is not None else embedder.encode([explanation])[0]
    vectors = embedder.encode([e.text for e in excerpts])
    sims = vectors @ query
    labels = np.array([e.activating for e in excerpts], bool)
    quantiles = np.array([e.quantile for e in excerpts], np.int64)
    details = {"context_ids": [e.context_id for e in excerpts], "windows": _windows(excerpts),
               "labels": labels.astype(int).tolist(), "quantiles": quantiles.tolist(),
               "similarities": [round(float(s), 4) for s in sims],
               "by_quantile": by_quantile("embedding", labels, sims, quantiles)}
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
    quantile: int = NON_ACTIVATING
    """Activation quantile of an activating excerpt (0 = highest); -1 for non-activating ones or when not recorded."""
    mass: float | None = None
    """The judge's ``P(0) + P(1)`` where it read the answer (None: embedding, or unknown)."""
    failed: bool = False
    """The judge answered off-format (no 0/1): left out of the score, neither right nor wrong."""


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
    failed: int = 0
    """Failed judgements (off-format answers), left out of ``score``."""
    failure_rate: float | None = None
    by_quantile: dict[int, float | None] = field(default_factory=dict)
    """Score per activation quantile (0 = highest; -1: the non-activating excerpts), see ``by_quantile``."""

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
    quantiles = d.get("quantiles") or []
    masses = d.get("mass") or []
    for i, cid in enumerate(ids):
        value = float(values[i]) if finite[i] else None
        failed = scorer != "embedding" and value is None
        if scorer == "embedding":
            predicted, wrong = None, bool(misordered[i] > 0)
        elif failed:
            predicted, wrong = None, False
        else:
            predicted = bool(value is not None and value > 0.5)
            wrong = predicted != bool(labels[i])
        window = windows[i]
        span = (int(window[0]), int(window[1])) if window and len(window) == 2 and int(window[0]) >= 0 else None
        quantile = int(quantiles[i]) if len(quantiles) == len(ids) and quantiles[i] is not None else NON_ACTIVATING
        mass = masses[i] if len(masses) == len(ids) else None
        out.append(ExcerptResult(int(cid), bool(labels[i]), value, predicted, int(misordered[i]), wrong, span, quantile,
                                 None if mass is None else float(mass), failed))
    auc = d.get("auroc")
    if auc is None and scorer == "embedding" and labels.any() and (~labels).any():
        auc = auroc(labels, ranked)
    return (None if auc is None else float(auc)), tuple(out)


def score_extras(details: str | dict | None) -> dict:
    """``ScoreDetail``'s ``failed``, ``failure_rate`` and ``by_quantile`` from a scores row's ``details``."""
    d = json.loads(details) if isinstance(details, str) else (details or {})
    rate = d.get("failure_rate")
    return {"failed": int(d.get("failed") or 0), "failure_rate": None if rate is None else float(rate),
            "by_quantile": {int(q): (None if v is None else float(v)) for q, v in (d.get("by_quantile") or {}).items()}}
