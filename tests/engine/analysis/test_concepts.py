"""Labelled concepts and their densities: the KDE against scipy's, the JSONL reader, and APP's fitted densities,
posterior and multipliers against hand computations on planted values."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from engine.analysis.concepts import TAIL_STDS, ConceptDensities, kde_on_grid, read_concepts


def test_kde_is_scipys_gaussian_kde_with_scotts_bandwidth():
    values = np.random.default_rng(0).gamma(2.0, 1.5, size=37)
    grid = np.linspace(-1, 15, 200)
    got = kde_on_grid(values, grid)
    assert got is not None
    np.testing.assert_allclose(got, gaussian_kde(values)(grid), rtol=1e-10)
    assert kde_on_grid(np.full(5, 2.0), grid) is None  # no spread: scipy raises, the reference skips the concept


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


def planted_latents():
    """3 concepts x 20 texts; latent 0 fires on concept 0 only, 1 on concepts 0 and 1, 2 on concept 1 only, 3 on
    all three; latent 4 fires on two texts of concept 2 and one of concept 0 (inactive there)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    values = np.zeros((60, 5))
    values[labels == 0, 0] = rng.uniform(1, 2, 20)
    values[labels == 0, 1], values[labels == 1, 1] = rng.normal(3, 0.5, 20), rng.normal(4, 0.5, 20)
    values[labels == 1, 2] = rng.uniform(1, 2, 20)
    for c, centre in enumerate((2.0, 2.5, 6.0)):
        values[labels == c, 3] = rng.normal(centre, 0.7, 20)
    values[[40, 41, 0], 4] = [1.0, 2.0, 3.0]
    return np.abs(values), labels


def test_concept_densities_fit_and_posterior_by_hand():
    values, labels = planted_latents()
    recorded = values > 0
    dens = ConceptDensities.fit(values, recorded, labels, 3, concept=0)
    assert dens.exclusive == [0] and dens.shared == [1, 3]
    a = torch.tensor([[3.2, 2.1], [3.9, 5.5], [2.8, 1.0]], dtype=torch.float64)  # [tokens, shared latents]
    post = dens.posterior(a).numpy()
    for j, latent in enumerate(dens.shared):
        kdes = [gaussian_kde(values[(labels == c) & recorded[:, latent], latent]) if recorded[labels == c, latent].sum() > 2
                else None for c in range(3)]
        for t in range(len(a)):
            p = [float(k(a[t, j].item())[0]) if k is not None else 0.0 for k in kdes]
            assert post[t, j] == pytest.approx(p[0] / (sum(p) + 1e-12), rel=1e-9)
    own = values[labels == 0, 3]
    mean, std = own.mean(), own.std(ddof=1)
    far = torch.tensor([[3.2, mean + (TAIL_STDS + 0.1) * std], [3.2, mean + (TAIL_STDS - 0.1) * std]], dtype=torch.float64)
    mult = dens.multipliers(far).numpy()
    assert mult[0, 1] == 1.0  # beyond the concept's tail: left alone
    assert mult[1, 1] == pytest.approx(1 - dens.posterior(far)[1, 1].item())
    assert mult[0, 0] == pytest.approx(1 - post[0, 0])


def test_other_concept_must_be_active_to_count():
    values, labels = planted_latents()
    dens = ConceptDensities.fit(values, values > 0, labels, 3, concept=2)
    # latent 4: 2 of 20 texts of concept 2 is 10%, not more: inactive, so not concept 2's; latent 3 is shared
    assert dens.exclusive == [] and dens.shared == [3]
    assert dens.bandwidth[0].gt(0).all()
