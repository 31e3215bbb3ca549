"""Concept separability (Fereidouni et al.): the KDE against scipy's, the generalized JS distance against scipy's
two-distribution JS and a hand formula for three, per-unit scores and summaries on planted units, the JSONL
reader, and the pooled unit values on a tiny model against single-text forwards."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, gaussian_kde

from engine.eval.separability import (
    SeparabilityConfig,
    js_distance,
    kde_on_grid,
    read_concepts,
    separability_rows,
    summary,
    unit_scores,
    unit_values,
)
from tests.engine.saes_util import random_sae


def test_kde_is_scipys_gaussian_kde_with_scotts_bandwidth():
    values = np.random.default_rng(0).gamma(2.0, 1.5, size=37)
    grid = np.linspace(-1, 15, 200)
    np.testing.assert_allclose(kde_on_grid(values, grid), gaussian_kde(values)(grid), rtol=1e-10)
    assert kde_on_grid(np.full(5, 2.0), grid) is None  # no spread: scipy raises, the reference skips the concept


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


def test_read_concepts(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                                       {"text": "c", "label": "x"}]) + "\n\n")
    got = read_concepts(path)
    assert got.texts == ["a", "b", "c"] and got.names == ["x", "y"] and list(got.labels) == [0, 1, 0]
    path.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_concepts(path)
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(ValueError, match="1 label"):
        read_concepts(path)
    with pytest.raises(FileNotFoundError, match="--concepts"):
        read_concepts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="pool"):
        SeparabilityConfig(pool="mean")


TEXTS = ["In the beginning was the word", "def main(): return 0", "import os", "The quick brown fox jumps"]


def test_unit_values_are_single_text_forwards(tiny_llama):
    lm, sae = tiny_llama, random_sae("topk", d_in=64, d_sae=128)
    last = unit_values(lm, sae, TEXTS, "last", batch_size=3)  # padded batches of different lengths
    top = unit_values(lm, sae, TEXTS, "max", batch_size=3)
    hook = sae.cfg.hook_name
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
        x = lm.capture(ids, hook)[hook][0].float()
        codes = sae(x).codes.float()
        np.testing.assert_allclose(last.neurons[i], x[-1].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last.latents[i], codes[-1].detach().numpy(), rtol=1e-4, atol=1e-4)
        # position 0 (the attention sink) is never counted
        np.testing.assert_allclose(top.neurons[i], x[1:].amax(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(top.latents[i], codes[1:].amax(0).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_separability_rows_on_a_tiny_model(tiny_llama, tmp_path):
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
