"""Decoder-cosine matching against brute force on small matrices: top matches, the one-to-one assignment
(LSA on the sparsified similarity, and greedy), and where the switch between them lies."""

import itertools

import numpy as np
import pytest
import torch

from engine.eval import matching
from engine.eval.matching import TopMatches, one_to_one, top_matches


def brute_cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na > 0, na, 1)) @ (b / np.where(nb > 0, nb, 1)).T


def sparsified(top: TopMatches, n_b: int, min_cos: float) -> np.ndarray:
    dense = np.zeros((top.ids.shape[0], n_b))
    for i in range(top.ids.shape[0]):
        for j, c in zip(top.ids[i], top.cos[i], strict=True):
            if c > min_cos:
                dense[i, j] = c
    return dense


def best_total(sim: np.ndarray) -> float:
    """The best one-to-one total over every injective map of rows to columns (rows <= columns)."""
    n_a, n_b = sim.shape
    return max(sum(sim[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(n_b), n_a))


def total(sim: np.ndarray, partner: np.ndarray) -> float:
    return float(sum(sim[i, j] for i, j in enumerate(partner) if j >= 0))


def test_top_matches_are_the_highest_cosines():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 16, generator=gen), torch.randn(53, 16, generator=gen)
    b[5] = 0  # a dead latent's zero row must not break the normalisation
    top = top_matches(a, b, m=4, chunk=10)
    cos = brute_cos(a, b)
    np.testing.assert_array_equal(top.ids, np.argsort(-cos, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(top.cos, -np.sort(-cos, axis=1)[:, :4], atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [2, 7])
def test_lsa_is_the_best_assignment_of_the_sparsified_similarity(seed, m):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 6, generator=gen), torch.randn(7, 6, generator=gen)
    top = top_matches(a, b, m=m)
    result = one_to_one(top, 7, min_cos=0.05, method="lsa")
    sim = sparsified(top, 7, 0.05)
    assert result.method == "lsa"
    assert total(sim, result.partner) == pytest.approx(best_total(sim))
    matched = result.partner[result.partner >= 0]
    assert len(set(matched.tolist())) == len(matched)  # one to one
    for i, j in enumerate(result.partner):  # an unmatched latent has no free candidate it could take
        if j >= 0:
            assert sim[i, j] > 0 and result.cos[i] == pytest.approx(sim[i, j], abs=1e-6)
        else:
            assert np.isnan(result.cos[i])


def test_greedy_takes_pairs_by_descending_cosine():
    top = TopMatches(np.array([[0, 1], [0, 1]]), np.array([[0.9, 0.8], [0.85, 0.1]], dtype=np.float32))
    greedy = one_to_one(top, 2, method="greedy")
    lsa = one_to_one(top, 2, method="lsa")
    np.testing.assert_array_equal(greedy.partner, [0, 1])  # 0.9 first, then row 1 takes what is left (0.1)
    np.testing.assert_array_equal(lsa.partner, [1, 0])  # 0.8 + 0.85 beats 0.9 + 0.1
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert total(sim, lsa.partner) == pytest.approx(best_total(sim))
    assert total(sim, lsa.partner) > total(sim, greedy.partner)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_a_reference_greedy(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(20, 8, generator=gen), torch.randn(30, 8, generator=gen)
    top = top_matches(a, b, m=3)
    sim = sparsified(top, 30, 0.0)
    want = np.full(20, -1)
    used = set()
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        i, j = divmod(int(flat), 30)
        if sim[i, j] > 0 and want[i] < 0 and j not in used:
            want[i] = j
            used.add(j)
    np.testing.assert_array_equal(one_to_one(top, 30, method="greedy").partner, want)


def test_auto_switches_to_greedy_above_the_dense_limit(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    top = top_matches(torch.randn(10, 4, generator=gen), torch.randn(12, 4, generator=gen), m=3)
    assert one_to_one(top, 12).method == "lsa"
    monkeypatch.setattr(matching, "DENSE_LIMIT", 119)
    assert one_to_one(top, 12).method == "greedy"
    with pytest.raises(ValueError, match="method"):
        one_to_one(top, 12, method="hungarian")
