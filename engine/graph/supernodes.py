"""Supernode suggestions: feature nodes of a pruned graph whose signed edge profiles (weights from every source and
to every target, side by side) point the same way, cosine >= 0.75 (Neuronpedia suggests supernodes from such
profiles). Groups are the connected components of the pairs over the threshold; singletons are not suggested."""

from __future__ import annotations

from typing import Any

import numpy as np

from .layout import kind_of


def profiles(document: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Feature node ids and their ``[n, 2 * n_nodes]`` profiles: incoming weights by source, outgoing by target."""
    ids = [str(n["node_id"]) for n in document["nodes"]]
    column = {node_id: i for i, node_id in enumerate(ids)}
    features = [str(n["node_id"]) for n in document["nodes"] if kind_of(n) == "feature"]
    row = {node_id: i for i, node_id in enumerate(features)}
    out = np.zeros((len(features), 2 * len(ids)))
    for link in document["links"]:
        source, target, weight = str(link["source"]), str(link["target"]), float(link["weight"])
        if target in row and source in column:
            out[row[target], column[source]] += weight
        if source in row and target in column:
            out[row[source], len(ids) + column[target]] += weight
    return features, out


def suggest(document: dict[str, Any], threshold: float = 0.75) -> list[list[str]]:
    """Groups of at least two feature node ids, largest first."""
    features, vectors = profiles(document)
    if len(features) < 2:
        return []
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    close = (unit @ unit.T >= threshold) & (norms > 0)[:, None] & (norms > 0)[None, :]
    parent = list(range(len(features)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1)), strict=True):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[str]] = {}
    for i, node_id in enumerate(features):
        groups.setdefault(find(i), []).append(node_id)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g))
