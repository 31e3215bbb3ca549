"""Where each node of a graph JSON is drawn: layer by layer (embeddings at the bottom, logits at the top) over the
prompt's positions, nodes sharing a (layer, position) cell spread side by side. Pure data, no plotting."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placed:
    """A node of a graph JSON with its drawing position."""

    node_id: str
    kind: str
    """feature, error, embedding, logit or supernode (a group drawn as one node)."""
    layer: int
    """-1 for embeddings; the logits' row is one above the last layer."""
    position: int
    feature: int
    influence: float | None
    activation: float | None
    label: str
    x: float
    y: float


_KINDS = {"cross layer transcoder": "feature", "mlp reconstruction error": "error", "embedding": "embedding",
          "logit": "logit", "supernode": "supernode"}


def kind_of(node: dict[str, Any]) -> str:
    return _KINDS.get(str(node.get("feature_type", "")), "feature")


def layer_of(node: dict[str, Any]) -> int:
    layer = str(node.get("layer", "0"))
    return -1 if layer == "E" else int(layer)


def place(document: dict[str, Any]) -> list[Placed]:
    """Every node of the graph JSON, placed: ``x`` = position (+ a spread within the cell, under 0.8 wide), ``y`` =
    layer (embeddings at -1)."""
    tokens = list(document.get("metadata", {}).get("prompt_tokens", []))
    cells: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for node in document["nodes"]:
        cells[(layer_of(node), int(node.get("ctx_idx", 0)))].append(node)
    placed: list[Placed] = []
    for (layer, pos), members in cells.items():
        members.sort(key=lambda n: -(n.get("influence") or 0.0) if kind_of(n) != "logit" else -n.get("token_prob", 0))
        width = min(0.8, 0.1 * (len(members) - 1))
        for i, node in enumerate(members):
            offset = 0.0 if len(members) == 1 else -width / 2 + width * i / (len(members) - 1)
            kind = kind_of(node)
            if kind == "embedding":
                label = tokens[pos] if pos < len(tokens) else f"token {pos}"
            elif kind == "logit":
                label = str(node.get("clerp", ""))
            elif kind == "supernode":
                total = node.get("influence_sum")
                label = (f"{node.get('clerp', '')} · {len(node.get('members', []))} features"
                         + (f" · influence (sum) {total:.3g}" if total is not None else ""))
            elif kind == "error":
                label = f"MLP error, layer {layer}"
            else:
                label = str(node.get("clerp") or "")
            placed.append(Placed(str(node["node_id"]), kind, layer, pos, int(node.get("feature", -1)),
                                 node.get("influence"), node.get("activation"), label, pos + offset, float(layer)))
    return placed
