"""Supernode suggestions: feature nodes of a pruned graph whose signed edge profiles (weights from every source and
to every target, side by side) point the same way, cosine >= 0.75 (Neuronpedia suggests supernodes from such
profiles). Groups are the connected components of the pairs over the threshold; singletons are not suggested.

Supernodes by hand (and accepted suggestions) are named groups saved beside the graph, drawn and steered as one node."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


# --- supernodes by hand: named groups of feature nodes, saved beside the graph ---------------------------------

GROUPS_SUFFIX = ".supernodes.json"
"""A graph ``NAME.json``'s supernodes live in ``NAME.supernodes.json`` beside it."""
MAX_NAME = 60


@dataclass(frozen=True)
class Supernode:
    """A named group of a graph's feature nodes, drawn and steered as one node."""

    id: str
    """``S<n>``: stable across renames; what the page pins and links."""
    name: str
    members: tuple[str, ...]


def groups_path(graph_path: str | Path) -> Path:
    graph_path = Path(graph_path)
    return graph_path.with_name(graph_path.stem + GROUPS_SUFFIX)


def is_graph_file(path: str | Path) -> bool:
    """A graph JSON, not a supernodes file beside one."""
    name = Path(path).name
    return name.endswith(".json") and not name.endswith(GROUPS_SUFFIX) and not name.startswith(".")


def load_groups(graph_path: str | Path) -> list[Supernode]:
    """The supernodes saved beside a graph (none when there is no file)."""
    path = groups_path(graph_path)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [Supernode(str(g["id"]), str(g["name"]), tuple(str(m) for m in g["members"]))
                for g in raw["supernodes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a supernodes file ({err})") from err


def check_groups(document: dict[str, Any], groups: list[Supernode]) -> None:
    """A ValueError unless every group has a name of its own and at least two feature nodes of the graph, each in
    one group only."""
    features = {str(n["node_id"]) for n in document["nodes"] if kind_of(n) == "feature"}
    names: set[str] = set()
    owner: dict[str, str] = {}
    for g in groups:
        if not g.name.strip() or len(g.name) > MAX_NAME:
            raise ValueError(f"a supernode's name must be 1 to {MAX_NAME} characters, got {g.name!r}")
        if g.name in names:
            raise ValueError(f"there is already a supernode called {g.name!r}")
        names.add(g.name)
        if len(set(g.members)) < 2:
            raise ValueError(f"supernode {g.name!r} needs at least two feature nodes, got {len(set(g.members))}")
        for member in g.members:
            if member not in features:
                raise ValueError(f"supernode {g.name!r}: {member} is not a feature node of this graph")
            if member in owner:
                raise ValueError(f"{member} is already in supernode {owner[member]!r}")
            owner[member] = g.name


def add_group(groups: list[Supernode], name: str, members: list[str]) -> list[Supernode]:
    """``groups`` with a new supernode (its id one past the largest so far)."""
    numbers = [int(g.id[1:]) for g in groups if g.id[1:].isdigit()]
    return [*groups, Supernode(f"S{max(numbers, default=0) + 1}", name.strip(), tuple(dict.fromkeys(members)))]


def rename_group(groups: list[Supernode], group_id: str, name: str) -> list[Supernode]:
    return [Supernode(g.id, name.strip(), g.members) if g.id == group_id else g for g in groups]


def remove_group(groups: list[Supernode], group_id: str) -> list[Supernode]:
    return [g for g in groups if g.id != group_id]


def save_groups(graph_path: str | Path, document: dict[str, Any], groups: list[Supernode]) -> Path:
    """Check ``groups`` against the graph and write them beside it, atomically, under the graph folder's lock."""
    from .. import atomic, lock

    check_groups(document, groups)
    graph_path = Path(graph_path)
    with lock.hold(graph_path.parent, name=f".{graph_path.stem}.lock"):
        return atomic.write_json(groups_path(graph_path),
                                 {"supernodes": [{"id": g.id, "name": g.name, "members": list(g.members)}
                                                 for g in groups]})


def collapse(document: dict[str, Any], groups: list[Supernode], influence: dict[str, float] | None = None
             ) -> dict[str, Any]:
    """The graph JSON with each supernode drawn as one node: its members' links summed per (source, target) after
    mapping members to the supernode (links between two members of the same supernode dropped), its influence the
    sum of its members' influences (``influence``: node id -> the node's influence on the targets; the JSON's own
    ``influence`` field is a cumulative share, which does not add), placed at its members' mean layer and mean
    position (rounded)."""
    if not groups:
        return document
    owner = {member: g.id for g in groups for member in g.members}
    by_id = {str(n["node_id"]): n for n in document["nodes"]}
    nodes = [n for n in document["nodes"] if str(n["node_id"]) not in owner]
    for g in groups:
        members = [by_id[m] for m in g.members if m in by_id]
        if not members:
            continue
        layers = [int(m["layer"]) for m in members]
        positions = [int(m.get("ctx_idx", 0)) for m in members]
        total = sum(influence.get(m, 0.0) for m in g.members) if influence else None
        nodes.append({"node_id": g.id, "feature": -1, "layer": str(round(sum(layers) / len(layers))),
                      "ctx_idx": round(sum(positions) / len(positions)), "feature_type": "supernode",
                      "clerp": g.name, "influence": None, "influence_sum": total, "activation": None,
                      "members": list(g.members)})
    weights: dict[tuple[str, str], float] = {}
    for link in document["links"]:
        source = owner.get(str(link["source"]), str(link["source"]))
        target = owner.get(str(link["target"]), str(link["target"]))
        if source == target and source in {g.id for g in groups}:
            continue
        weights[(source, target)] = weights.get((source, target), 0.0) + float(link["weight"])
    links = [{"source": s, "target": t, "weight": w} for (s, t), w in weights.items()]
    return {**document, "nodes": nodes, "links": links}
