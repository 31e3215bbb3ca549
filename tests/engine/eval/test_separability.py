"""Concept separability (Fereidouni et al.): the generalized JS distance against scipy's two-distribution JS and a
hand formula for three, per-unit scores and summaries on planted units (against scipy's KDE), the rows on a tiny
model."""

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, gaussian_kde

from engine.eval.separability import SeparabilityConfig, js_distance, separability_rows, summary, unit_scores
from tests.engine.saes_util import random_sae


def test_js_distance_against_scipy_and_by_hand():
    rng = np.random.default_rng(1)
    p, q, r = rng.uniform(size=(3, 50))
    eps = 1e-10
    assert js_distance([p, q]) == pytest.approx(jensenshannon(p + eps, q + eps, base=2), rel=1e-9)
    dists = [(d + eps) / (d + eps).sum() for d in (p, q, r)]
    mix = np.mean(dists, 0)
    hand = math.sqrt(entropy(mix, base=2) - np.mean([entropy(d, base=2) for d in dists])) / math.sqrt(math.log2(3))
    assert js_distance([p, q, r]) == pytest.approx(hand, rel=1e-9)
    assert js_distance([p, p, p]) == pytest.approx(0.0, abs=1e-6)
    disjoint = np.eye(3)  # three point masses on different grid points: as separable as can be
    assert js_distance(list(disjoint)) == pytest.approx(1.0, abs=1e-6)


def planted():
    """30 texts per concept (A, B, C) and six units with known answers."""
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], 30)
    values = np.zeros((90, 6))
    a, b, c = labels == 0, labels == 1, labels == 2
    values[a, 0] = rng.uniform(1, 2, a.sum())  # unit 0: only A -> monosemantic, 1
    same = rng.uniform(1, 3, 30)
    values[a, 1], values[b, 1] = same, same  # unit 1: A and B, identical values -> 0
    values[a, 2], values[b, 2] = rng.uniform(1, 1.5, 30), rng.uniform(20, 21, 30)  # unit 2: far apart -> ~1
    values[a, 3] = rng.uniform(1, 2, 30)
    values[np.nonzero(c)[0][:3], 3] = 5.0  # unit 3: C fires on 3 of 30 = 10%, not more: inactive -> 1
    values[a, 5] = rng.normal(2, 1, 30) ** 2 + 0.1  # unit 5: A and B overlap (hand check below)
    values[b, 5] = rng.normal(3, 1, 30) ** 2 + 0.1
    return values, values > 0, labels  # unit 4 never fires


def test_unit_scores_on_planted_units():
    values, recorded, labels = planted()
    scores = unit_scores(values, recorded, labels, 3, share=0.1, grid=1000)
    assert list(scores.n_active) == [1, 2, 2, 1, 0, 2]
    assert scores.score[0] == 1.0 and scores.score[3] == 1.0 and math.isnan(scores.score[4])
    assert scores.score[1] == pytest.approx(0.0, abs=1e-6)
    assert scores.score[2] > 0.99
    # unit 5 by hand: scipy KDEs of A's and B's values on 1000 points over all its values, scipy's JS distance
    a, b = values[labels == 0, 5], values[labels == 1, 5]
    grid = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 1000)
    hand = jensenshannon(gaussian_kde(a)(grid) + 1e-10, gaussian_kde(b)(grid) + 1e-10, base=2)
    assert scores.score[5] == pytest.approx(hand, rel=1e-8)
    assert 0.05 < hand < 0.95
    got = summary(scores)
    scored = scores.score[[0, 1, 2, 3, 5]]
    assert got["mean_js_all"] == pytest.approx(scored.mean())
    assert got["mean_js_polysemantic"] == pytest.approx(scores.score[[1, 2, 5]].mean())
    assert got["polysemantic_fraction"] == pytest.approx(3 / 5) and got["n_scored"] == 5 and got["n_degenerate"] == 0


def test_a_concept_needs_more_than_its_share_and_two_texts():
    labels = np.repeat([0, 1], 10)
    values = np.zeros((20, 1))
    values[:10, 0] = np.linspace(1, 2, 10)
    values[10:12, 0] = [3.0, 4.0]  # 2 of 10 texts of concept 1: 20% > 10%, and two texts: active
    scores = unit_scores(values, values > 0, labels, 2)
    assert scores.n_active[0] == 2 and 0 < scores.score[0] <= 1
    values[11, 0] = 0.0  # one text only: inactive, the unit is monosemantic
    assert unit_scores(values, values > 0, labels, 2).score[0] == 1.0
    values[10:12, 0] = [7.0, 7.0]  # active, but no spread: no density, and too few densities to score
    values[:10, 0] = 7.0
    degenerate = unit_scores(values, values > 0, labels, 2)
    assert math.isnan(degenerate.score[0]) and summary(degenerate)["n_degenerate"] == 1


TEXTS = ["In the beginning was the word", "def main(): return 0", "import os", "The quick brown fox jumps"]


def test_separability_rows_on_a_tiny_model(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="pool"):
        SeparabilityConfig(pool="mean")
    path = tmp_path / "concepts.jsonl"
    lines = [{"text": f"{t} {i}", "label": "code" if "(" in t or "import" in t else "prose"}
             for i in range(6) for t in TEXTS]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    rows = separability_rows(tiny_llama, random_sae("topk", d_in=64, d_sae=128), SeparabilityConfig(concepts=str(path)))
    got = {r.metric: r.value for r in rows if r.task is None}
    for prefix in ("", "neuron_"):
        assert 0 <= got[prefix + "mean_js_polysemantic"] <= got[prefix + "mean_js_all"] <= 1
    # a neuron records every value, so every concept is active for every neuron: all 64 are polysemantic
    assert got["neuron_polysemantic_fraction"] == 1.0 and got["neuron_n_scored"] == 64
    assert {r.task: r.value for r in rows if r.metric == "texts"} == {"prose": 12.0, "code": 12.0}
