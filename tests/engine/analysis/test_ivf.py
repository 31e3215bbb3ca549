"""Exact and IVF nearest neighbours among unit rows, and the recall of one against the other, against numpy."""

import numpy as np
import pytest
import torch

from engine.analysis.ivf import exact_rows, ivf_neighbors, recall_at_n, spherical_kmeans


def _unit_rows(n: int, d: int, seed: int = 0, clusters: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if clusters:  # planted structure, as trained decoders have: rows near one of a few centres
        centres = rng.standard_normal((clusters, d)) * 3
        x += centres[rng.integers(0, clusters, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32)


def _brute(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return ids, np.take_along_axis(sims, ids, 1)


def test_exact_rows_equal_brute_force():
    x = _unit_rows(300, 16)
    ids, cos = _brute(x.numpy().astype(np.float64), 5)
    got = exact_rows(x, torch.arange(300), 5, chunk=64)
    assert np.array_equal(got.ids, ids)
    assert np.allclose(got.cos, cos, atol=1e-5)


def test_ivf_probing_every_list_is_exact_and_its_cosines_are_true():
    x = _unit_rows(400, 16, clusters=6)
    ids, _ = _brute(x.numpy().astype(np.float64), 5)
    got = ivf_neighbors(x, 5, n_lists=8, n_probe=8)
    assert np.array_equal(got.ids, ids)
    partial = ivf_neighbors(x, 5, n_lists=20, n_probe=3)
    xn = x.numpy()
    true = np.einsum("nd,nkd->nk", xn, xn[partial.ids])
    assert np.allclose(partial.cos, true, atol=1e-5)
    assert not (partial.ids == np.arange(400)[:, None]).any()  # never its own neighbour
    assert (np.diff(partial.cos, axis=1) <= 1e-6).all()  # best first


def test_recall_equals_a_brute_force_recount():
    x = _unit_rows(500, 12, clusters=8, seed=1)
    found = ivf_neighbors(x, 10, n_lists=25, n_probe=2)
    ids, _ = _brute(x.numpy().astype(np.float64), 10)
    recount = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found.ids, ids, strict=True)])
    whole = recall_at_n(x, found.ids, sample=500)
    assert whole.value == pytest.approx(recount) and len(whole.rows) == 500
    assert 0.2 < recount < 1.0  # a partial search: the comparison is not trivial either way
    part = recall_at_n(x, found.ids, sample=100, seed=3)
    rows = part.rows
    assert len(rows) == 100 == len(set(rows.tolist()))
    sub = np.mean([len(set(found.ids[r]) & set(ids[r])) / 10 for r in rows])
    assert part.value == pytest.approx(sub)


def test_spherical_kmeans_converges_to_the_normalised_means_of_its_lists():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4]
    x = centres[rng.integers(0, 4, 400)] + 0.05 * rng.standard_normal((400, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = spherical_kmeans(torch.tensor(x, dtype=torch.float32), 4, iters=20).numpy()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assign = (x @ got.T).argmax(1)
    for c in np.unique(assign):  # Lloyd's fixed point, recomputed in numpy
        mean = x[assign == c].sum(0)
        assert np.allclose(got[c], mean / np.linalg.norm(mean), atol=1e-4)


@pytest.mark.cuda
def test_ivf_on_cuda_equals_brute_force_when_every_list_is_probed():
    x = _unit_rows(600, 32, clusters=5, seed=2)
    ids, _ = _brute(x.numpy().astype(np.float64), 10)
    got = ivf_neighbors(x.cuda(), 10, n_lists=12, n_probe=12)
    assert np.array_equal(got.ids, ids)
    assert recall_at_n(x.cuda(), got.ids, sample=600).value == 1.0
