"""Supernode suggestions against a brute-force cosine on planted edge profiles."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from engine.graph.supernodes import (
    Supernode,
    add_group,
    collapse,
    groups_path,
    is_graph_file,
    load_groups,
    profiles,
    remove_group,
    rename_group,
    save_groups,
    suggest,
)


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


def test_collapse_sums_edges_and_influence_by_hand():
    """a and b as one supernode: links into and out of it are the members' links summed per other end, the link
    between them is dropped, and its influence is the members' sum."""
    document = planted()
    document["links"].append({"source": "a", "target": "b", "weight": 9.0})
    document["nodes"][2]["layer"], document["nodes"][3]["layer"], document["nodes"][3]["ctx_idx"] = "1", "4", 3
    out = collapse(document, [Supernode("S1", "ab", ("a", "b"))], {"a": 0.25, "b": 0.5, "c": 0.125})
    links = {(x["source"], x["target"]): x["weight"] for x in out["links"]}
    assert links[("E1", "S1")] == 1.0 + 2.0 and links[("E2", "S1")] == 0.5 + 1.0 and links[("S1", "L")] == 2.0 + 4.0
    assert ("S1", "S1") not in links and not {"a", "b"} & {x for pair in links for x in pair}
    assert links[("E1", "c")] == 0.1 and links[("c", "L")] == -3.0  # the rest untouched
    assert len(out["links"]) == len(document["links"]) - 7 + 3  # 7 member links became 3, the internal one dropped
    node = next(n for n in out["nodes"] if n["node_id"] == "S1")
    assert node["influence_sum"] == 0.75 and node["members"] == ["a", "b"]
    assert (node["layer"], node["ctx_idx"]) == ("2", 2)  # mean layer (1+4)/2 and mean position (0+3)/2, rounded
    assert [n["node_id"] for n in out["nodes"]].count("a") == 0
    assert collapse(document, []) is document


def test_groups_are_checked_saved_and_restored(tmp_path):
    document = planted()
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(document))
    assert load_groups(graph) == []
    groups = add_group([], " first ", ["a", "b"])
    groups = add_group(groups, "second", ["c", "d"])
    assert [(g.id, g.name) for g in groups] == [("S1", "first"), ("S2", "second")]
    save_groups(graph, document, groups)
    assert groups_path(graph).name == "g.supernodes.json" and not is_graph_file(groups_path(graph))
    assert is_graph_file(graph) and load_groups(graph) == groups
    renamed = rename_group(remove_group(groups, "S1"), "S2", "cd")
    save_groups(graph, document, add_group(renamed, "again", ["a", "b"]))
    assert [(g.id, g.name, g.members) for g in load_groups(graph)] == [("S2", "cd", ("c", "d")),
                                                                        ("S3", "again", ("a", "b"))]
    for bad, message in ((add_group(groups, "third", ["a", "c"]), "already in supernode"),
                         (add_group([], "x", ["a", "E1"]), "not a feature node"),
                         (add_group([], "x", ["a"]), "at least two"),
                         (add_group(add_group([], "x", ["a", "b"]), "x", ["c", "d"]), "already a supernode called"),
                         (add_group([], " ", ["a", "b"]), "name")):
        with pytest.raises(ValueError, match=message):
            save_groups(graph, document, bad)
    assert [g.id for g in load_groups(graph)] == ["S2", "S3"]  # nothing half-written
