"""Pruning by influence and the graph's scores, as circuit-tracer defines them.

With ``N = |A|`` row-normalised (each target's incoming absolute weights sum to 1) and ``w`` the targets'
probabilities, a node's influence is ``(w N + w N^2 + ...)``: its share of the targets through every path. Nodes are
kept down to the fewest covering ``node_threshold`` of the total influence (tokens and targets always kept); edges of
the kept nodes are scored by ``N_pruned[t, s] * (influence_t + w_t)`` and kept down to ``edge_threshold``; then
features and errors with no kept outgoing edge, and features with no kept incoming edge, are dropped until none is.
Replacement score: token influence / (token + error influence). Completeness score: the influence-weighted fraction
of each node's normalised input that does not come from error nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .attribution import Graph


def normalise(matrix: torch.Tensor) -> torch.Tensor:
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def influence(normalised: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w N + w N^2 + ...`` (the graph is acyclic, so the series ends)."""
    current = weights @ normalised
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalised
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps (is the graph cyclic?)")


def threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the fewest top scores whose sum reaches ``fraction`` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def target_weights(graph: Graph) -> torch.Tensor:
    weights = torch.zeros(graph.adjacency.shape[0])
    weights[graph.logit_start:] = graph.targets.probabilities
    return weights


class Pruned(NamedTuple):
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    """Each node's influence on the targets (unpruned graph)."""
    cumulative: torch.Tensor
    """Each node's cumulative influence share when nodes are sorted by influence (what Neuronpedia shows)."""


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes and edges that carry most of the influence on the targets."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    adjacency, weights = graph.adjacency, target_weights(graph)
    fixed = graph.token_start  # tokens and logits from here on
    node_influence = influence(normalise(adjacency), weights)
    node_mask = node_influence >= threshold(node_influence, node_threshold)
    node_mask[fixed:] = True
    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalised = normalise(pruned)
    edge_scores = normalised * (influence(normalised, weights) + weights)[:, None]
    edge_mask = edge_scores >= threshold(edge_scores.flatten(), edge_threshold)
    n_features = graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)  # features and errors need an outgoing edge
        node_mask[:n_features] &= edge_mask[:n_features].any(1)  # features need an incoming edge
        if torch.equal(node_mask, before):
            break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return Pruned(node_mask, edge_mask, node_influence, cumulative)


class Scores(NamedTuple):
    replacement: float
    completeness: float


def scores(graph: Graph) -> Scores:
    """circuit-tracer's replacement and completeness scores of the unpruned graph."""
    weights = target_weights(graph)
    normalised = normalise(graph.adjacency)
    node_influence = influence(normalised, weights)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = node_influence[graph.token_start:graph.logit_start].sum()
    error_influence = node_influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-30)
    non_error = 1 - normalised[:, errors].sum(-1)
    output_influence = node_influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return Scores(float(replacement), float(completeness))
