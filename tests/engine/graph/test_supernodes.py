"""Supernode suggestions against a brute-force cosine on planted edge profiles."""

from __future__ import annotations

import itertools

import numpy as np

from engine.graph.supernodes import profiles, suggest


def _node(node_id: str, kind: str) -> dict:
    return {"node_id": node_id, "feature_type": kind, "layer": "0", "ctx_idx": 0}


def planted() -> dict:
    """a and b read and write alike (b = 2 a); c reads like them but writes the opposite sign; d reads elsewhere."""
    nodes = [_node(x, "embedding") for x in ("E1", "E2")] + [_node(x, "cross layer transcoder") for x in "abcd"]
    nodes.append(_node("L", "logit"))
    links = [
        {"source": "E1", "target": "a", "weight": 1.0}, {"source": "E2", "target": "a", "weight": 0.5},
        {"source": "a", "target": "L", "weight": 2.0},
        {"source": "E1", "target": "b", "weight": 2.0}, {"source": "E2", "target": "b", "weight": 1.0},
        {"source": "b", "target": "L", "weight": 4.0},
        {"source": "E1", "target": "c", "weight": 0.1}, {"source": "c", "target": "L", "weight": -3.0},
        {"source": "E2", "target": "d", "weight": -1.0}, {"source": "d", "target": "L", "weight": 0.2},
    ]
    return {"metadata": {}, "nodes": nodes, "links": links}


def test_suggestions_are_the_components_of_close_profiles():
    document = planted()
    ids, vectors = profiles(document)
    assert ids == ["a", "b", "c", "d"]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    close = {(x, y) for (i, x), (j, y) in itertools.combinations(enumerate(ids), 2) if unit[i] @ unit[j] >= 0.75}
    assert close == {("a", "b")}  # brute force on the planted profiles
    assert suggest(document) == [["a", "b"]]
    assert suggest(document, threshold=-1.0) == [["a", "b", "c", "d"]]
    assert suggest({"metadata": {}, "nodes": [], "links": []}) == []
