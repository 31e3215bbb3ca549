import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from engine.circuits.scores import (
    edge_scores,
    node_scores,
    operating_point,
    roc,
    top_pairs,
    unique_cooccurrences,
    unique_to_positive,
)

# 3 heads, 3 positive and 3 negative prompts
POS = np.array([[1, 5, 7], [2, 5, 7], [3, 5, 8]])
NEG = np.array([[1, 5, 9], [1, 6, 9], [1, 5, 9]])


def test_node_scores_by_hand():
    # head 0: {1,2,3} - {1} = 2; head 1: {5} - {5,6} = 0; head 2: {7,8} - {9} = 2
    np.testing.assert_array_equal(unique_to_positive(POS, NEG), [2, 0, 2])
    # normalised by the distinct codes on both: 2/3, 0/2, 2/3
    np.testing.assert_allclose(unique_to_positive(POS, NEG, normalise=True), [2 / 3, 0, 2 / 3])
    e = np.exp([2.0, 0.0, 2.0])
    np.testing.assert_allclose(node_scores(POS, NEG), e / e.sum())


def brute_cooccurrence(pos, neg, normalise):
    """The reference's dense co-occurrence arrays, then its counting (written out with loops)."""
    n, f = pos.shape[1], max(pos.max(), neg.max()) + 1

    def matrix(codes):
        m = np.zeros((n, n, f, f))
        for e, h1, h2 in itertools.product(range(codes.shape[0]), range(n), range(n)):
            if h1 != h2:
                m[h1, h2, codes[e, h1], codes[e, h2]] += 1
        return m

    p, q = matrix(pos), matrix(neg)
    out = np.zeros((n, n))
    for h1, h2 in itertools.product(range(n), range(n)):
        if h1 != h2:
            unique = (p[h1, h2] > 0) & ~(q[h1, h2] > 0)
            total = np.sum(p[h1, h2] > 0) + np.sum(q[h1, h2] > 0)
            out[h1, h2] = (unique.sum() / total if total else 0) if normalise else unique.sum()
    return out


def test_unique_cooccurrences_by_hand():
    got = unique_cooccurrences(POS, NEG)
    # pairs (0, 1) on positives: (1,5) (2,5) (3,5); on negatives (1,5) (1,6): unique 2
    assert got[0, 1] == 2 and got[1, 0] == 2
    # (1, 2): positives (5,7) (5,8), negatives (5,9) (6,9): unique 2; (0, 2): (1,7) (2,7) (3,8) vs (1,9): 3
    assert got[1, 2] == 2 and got[0, 2] == 3 and got[2, 0] == 3
    assert np.all(np.diag(got) == 0)
    for normalise in (False, True):
        np.testing.assert_allclose(unique_cooccurrences(POS, NEG, normalise), brute_cooccurrence(POS, NEG, normalise))


def test_unique_cooccurrences_match_the_dense_reference_on_random_codes():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, (8, 5)), rng.integers(0, 6, (7, 5))
    for normalise in (False, True):
        np.testing.assert_allclose(unique_cooccurrences(pos, neg, normalise), brute_cooccurrence(pos, neg, normalise))


def test_edge_scores_by_hand():
    counts = np.array([[0, 2, 3], [2, 0, 2], [3, 1, 0]], dtype=float)
    # ranked (descending, ties: higher flat index first): (2,0)=3 (0,2)=3 (1,2)=2 (1,0)=2 (0,1)=2 (2,1)=1 ...
    # heads listed: 2,0, 0,2, 1,2, 1,0, 0,1, ...; k = 9 // 2 = 4 -> heads 2,0,0,2: counts head0=2, head1=0, head2=2
    e = np.exp([2.0, 0.0, 2.0])
    np.testing.assert_allclose(edge_scores(counts), e / e.sum())
    # k = 6 -> adds heads 1, 2: head0=2, head1=1, head2=3
    e = np.exp([2.0, 1.0, 3.0])
    np.testing.assert_allclose(edge_scores(counts, k=6), e / e.sum())
    assert top_pairs(counts, 3) == [(2, 0, 3.0), (0, 2, 3.0), (1, 2, 2.0)]


def test_roc_auc_equals_scikit_learn():
    rng = np.random.default_rng(3)
    for trial in range(20):
        y = rng.random(40) < 0.3
        y[0], y[1] = True, False
        s = rng.integers(0, 6, 40).astype(float) if trial % 2 else rng.random(40)  # with and without ties
        curve = roc(y, s)
        assert curve.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(curve.fpr, fpr)
        np.testing.assert_allclose(curve.tpr, tpr)


def test_operating_point_and_one_class_refusal():
    y = np.array([1, 1, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    op = operating_point(y, s, roc(y, s))
    # thresholds 0.9 .8 .7 .3: (tpr, 1-fpr) = (1/3,1) (2/3,1) (2/3,2/3) (1,2/3); F1 best at 0.3: 2*(2/3)/(5/3) = 0.8
    # and at 0.8: 2*(2/3)/(5/3) = 0.8 too: the first (higher threshold) wins, as np.argmax gives
    assert op.threshold == 0.8 and op.f1 == pytest.approx(0.8)
    assert op.precision == 1.0 and op.recall == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="needs both classes"):
        roc(np.ones(4), s[:4])
