"""Pruning and scores against numpy on planted graphs (influence as w N (I - N)^-1, thresholds by sorting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.graph.attribution import Graph, Targets
from engine.graph.prune import influence, normalise, prune, scores


def planted(n_features: int = 6, n_layers: int = 2, n_pos: int = 2, n_logits: int = 2, seed: int = 0) -> Graph:
    """A random DAG in circuit-tracer's node order: features feed later features and the logits."""
    rng = np.random.default_rng(seed)
    n = n_features + (n_layers + 1) * n_pos + n_logits
    adjacency = np.zeros((n, n), dtype=np.float32)
    sources = n_features + (n_layers + 1) * n_pos  # every non-logit node
    for t in range(n_features):  # feature t reads from features before it and from errors/tokens
        adjacency[t, :t] = rng.normal(size=t)
        adjacency[t, n_features:sources] = rng.normal(size=sources - n_features)
    adjacency[n - n_logits:, :sources] = rng.normal(size=(n_logits, sources))
    adjacency[np.abs(adjacency) < 0.3] = 0
    features = torch.tensor([[i % n_layers, i % n_pos, i] for i in range(n_features)])
    probs = torch.tensor(rng.dirichlet(np.ones(n_logits)) * 0.9, dtype=torch.float32)
    targets = Targets(list(range(n_logits)), [str(i) for i in range(n_logits)], probs, torch.zeros(n_logits, 4))
    return Graph("p", list(range(n_pos)), n_layers, features, torch.ones(n_features), n_features, targets,
                 torch.from_numpy(adjacency), [])


def _numpy_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    a = np.abs(adjacency.astype(np.float64))
    n = a / np.maximum(a.sum(1, keepdims=True), 1e-10)
    return weights @ n @ np.linalg.inv(np.eye(len(n)) - n)


def _weights(g: Graph) -> np.ndarray:
    w = np.zeros(g.adjacency.shape[0])
    w[g.logit_start:] = g.targets.probabilities.numpy()
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_is_the_path_sum(seed):
    g = planted(seed=seed)
    w = _weights(g)
    got = influence(normalise(g.adjacency), torch.tensor(w, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), _numpy_influence(g.adjacency.numpy(), w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_keeps_the_covering_nodes(seed):
    g = planted(n_features=12, seed=seed)
    pruned = prune(g, node_threshold=0.8, edge_threshold=0.98)
    node_influence = _numpy_influence(g.adjacency.numpy(), _weights(g))
    order = np.sort(node_influence)[::-1]
    covering = order[min(np.searchsorted(np.cumsum(order) / order.sum(), 0.8), len(order) - 1)]
    kept_first = node_influence >= covering * (1 - 1e-5)
    kept = pruned.node_mask.numpy()
    assert kept[g.token_start:].all()  # tokens and logits always kept
    assert not (kept[:g.token_start] & ~kept_first[:g.token_start]).any()  # only nodes that passed the threshold
    edges = pruned.edge_mask.numpy()
    assert not edges[~kept].any() and not edges[:, ~kept].any()
    assert (edges[:, :g.token_start].any(0) | ~kept[:g.token_start]).all()  # kept features/errors have outputs
    assert (edges[:g.n_features].any(1) | ~kept[:g.n_features]).all()  # kept features have inputs
    assert not edges[g.adjacency.numpy() == 0].any()
    np.testing.assert_allclose(np.sort(pruned.cumulative.numpy()),
                               np.cumsum(order) / order.sum(), rtol=1e-5)


def test_thresholds_of_one_keep_every_edge_of_a_node():
    g = planted(seed=3)
    pruned = prune(g, node_threshold=1.0, edge_threshold=1.0)
    live = (g.adjacency != 0) & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    assert torch.equal(pruned.edge_mask, live)
    with pytest.raises(ValueError, match="node_threshold"):
        prune(g, node_threshold=1.5)


def test_scores_by_hand():
    g = planted(seed=4)
    w = _weights(g)
    a = g.adjacency.numpy().astype(np.float64)
    node_influence = _numpy_influence(a, w)
    errors = slice(g.error_start, g.token_start)
    tokens = slice(g.token_start, g.logit_start)
    replacement = node_influence[tokens].sum() / (node_influence[tokens].sum() + node_influence[errors].sum())
    n = np.abs(a) / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-10)
    out = node_influence + w
    completeness = ((1 - n[:, errors].sum(1)) * out).sum() / out.sum()
    got = scores(g)
    assert got.replacement == pytest.approx(replacement, rel=1e-5)
    assert got.completeness == pytest.approx(completeness, rel=1e-5)
    g.adjacency[:, errors] = 0  # no error edges: everything passes through features and tokens
    assert scores(g) == pytest.approx((1.0, 1.0))
