"""Graph files: the JSON circuit-tracer's ``create_graph_files`` writes and Neuronpedia's graph viewer reads (its
``metadata``, ``qParams``, ``nodes`` and ``links``; node ids ``{layer}_{latent}_{pos}`` for features,
``0_{layer}_{pos}`` for errors, ``E_{token}_{pos}`` for embeddings, ``{n_layers+1}_{token}_{pos}`` for logits), plus a
``saescope`` block (scores, missing layers, timings) those readers ignore; and Parquet tables of every node (with
its influence and whether pruning kept it) and of the kept edges, for saescope. All written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from .build import Built

NODE_SCHEMA = pa.schema([
    ("node_id", pa.string()), ("kind", pa.string()), ("layer", pa.int32()), ("position", pa.int32()),
    ("feature", pa.int64()), ("activation", pa.float32()), ("influence", pa.float32()),
    ("cumulative", pa.float32()), ("kept", pa.bool_()),
])
EDGE_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string()), ("weight", pa.float32())])
KINDS = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "embedding": "embedding",
         "logit": "logit"}
"""saescope's node kinds -> circuit-tracer's ``feature_type``."""


def slug_of(prompt: str) -> str:
    return "graph-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


def node_rows(built: Built) -> list[dict[str, Any]]:
    """Every node of the unpruned graph in adjacency order, with its ids and influence."""
    g, p = built.graph, built.pruned
    rows: list[dict[str, Any]] = []
    for (layer, pos, latent), act in zip(g.features.tolist(), g.activations.tolist(), strict=True):
        rows.append({"node_id": f"{layer}_{latent}_{pos}", "kind": "feature", "layer": layer, "position": pos,
                     "feature": latent, "activation": act})
    for layer in range(g.n_layers):
        for pos in range(g.n_pos):
            rows.append({"node_id": f"0_{layer}_{pos}", "kind": "error", "layer": layer, "position": pos,
                         "feature": -1, "activation": None})
    for pos, token in enumerate(g.ids):
        rows.append({"node_id": f"E_{token}_{pos}", "kind": "embedding", "layer": -1, "position": pos,
                     "feature": token, "activation": None})
    for token in g.targets.tokens:
        rows.append({"node_id": f"{g.n_layers + 1}_{token}_{g.n_pos - 1}", "kind": "logit", "layer": g.n_layers,
                     "position": g.n_pos - 1, "feature": token, "activation": None})
    for i, row in enumerate(rows):
        row.update(influence=float(p.influence[i]), cumulative=float(p.cumulative[i]), kept=bool(p.node_mask[i]))
    return rows


def neuronpedia_json(built: Built, rows: list[dict[str, Any]], slug: str, scan: str,
                     sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The graph JSON (pruned nodes and links) as circuit-tracer writes it."""
    g, p = built.graph, built.pruned
    nodes = []
    first_logit = g.logit_start
    for i, row in enumerate(rows):
        if not row["kept"]:
            continue
        kind, layer, pos = row["kind"], row["layer"], row["position"]
        node: dict[str, Any] = {
            "node_id": row["node_id"], "feature": row["feature"] if kind != "embedding" else pos,
            "layer": "E" if kind == "embedding" else str(layer + 1 if kind == "logit" else layer), "ctx_idx": pos,
            "feature_type": KINDS[kind], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "clerp": "", "influence": row["cumulative"], "activation": row["activation"],
        }
        if kind == "feature":
            node["jsNodeId"] = f"{layer}_{row['feature']}-0"
        elif kind == "error":
            node["jsNodeId"] = f"{layer}_{pos}-0"
        elif kind == "embedding":
            node["jsNodeId"] = f"E_{row['feature']}-{pos}"
            node["influence"] = row["cumulative"]
        else:
            j = i - first_logit
            prob = float(g.targets.probabilities[j])
            node.update(jsNodeId=f"L_{row['feature']}-{pos}", token_prob=prob, is_target_logit=j == 0,
                        clerp=f'Output "{g.targets.labels[j]}" (p={prob:.3f})', influence=None)
        nodes.append(node)
    kept_ids = {n["node_id"] for n in nodes}
    targets, origins = p.edge_mask.nonzero(as_tuple=True)
    links = [{"source": rows[s]["node_id"], "target": rows[t]["node_id"], "weight": float(g.adjacency[t, s])}
             for t, s in zip(targets.tolist(), origins.tolist(), strict=True)
             if rows[s]["node_id"] in kept_ids and rows[t]["node_id"] in kept_ids]
    cfg = built.config
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": built.token_texts,
                     "prompt": g.prompt, "node_threshold": cfg.node_threshold},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
        "saescope": {"replacement_score": built.scores.replacement, "completeness_score": built.scores.completeness,
                     "missing_layers": g.missing_layers, "n_layers": g.n_layers, "n_active_features": g.n_active,
                     "n_feature_nodes": g.n_features, "edge_threshold": cfg.edge_threshold,
                     "targets": g.targets.labels, "token_ids": g.ids, "timings": g.timings, **(sources or {})},
    }


def write_graph(built: Built, out: str | Path, scan: str = "saescope", sources: dict[str, str] | None = None
                ) -> dict[str, Path]:
    """``out`` (the graph JSON) and, beside it, ``<stem>.nodes.parquet`` and ``<stem>.edges.parquet``."""
    out = Path(out)
    slug = out.stem
    rows = node_rows(built)
    document = neuronpedia_json(built, rows, slug, scan, sources)
    nodes = pa.Table.from_pylist(rows, schema=NODE_SCHEMA)
    edges = pa.Table.from_pylist(document["links"], schema=EDGE_SCHEMA)
    paths = {"json": out, "nodes": out.with_name(f"{slug}.nodes.parquet"),
             "edges": out.with_name(f"{slug}.edges.parquet")}
    atomic.write_file(paths["nodes"], lambda tmp: pq.write_table(nodes, tmp))
    atomic.write_file(paths["edges"], lambda tmp: pq.write_table(edges, tmp))
    atomic.write_text(paths["json"], json.dumps(document) + "\n")  # last: a graph without its JSON is incomplete
    return paths


def read_graph(path: str | Path) -> dict[str, Any]:
    """A graph JSON (saescope's or circuit-tracer's), checked for the keys the page draws."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"graph file {path} does not exist") from None
    except ValueError as err:
        raise ValueError(f"{path} is not a graph JSON file ({err})") from err
    if not isinstance(document, dict) or not {"metadata", "nodes", "links"} <= set(document):
        raise ValueError(f"{path} is not a graph JSON file (it needs metadata, nodes and links)")
    return document


def node_influences(path: str | Path) -> dict[str, float]:
    """Node id -> its influence on the targets, from the ``<stem>.nodes.parquet`` beside a graph JSON (empty for a
    graph written by another tool, which has none)."""
    path = Path(path)
    table_path = path.with_name(f"{path.stem}.nodes.parquet")
    if not table_path.is_file():
        return {}
    table = pq.read_table(table_path, columns=["node_id", "influence"])
    return dict(zip(table.column("node_id").to_pylist(), table.column("influence").to_pylist(), strict=True))


def make_graph(lm, transcoders_dir: str | Path, prompt: str, cfg, out: str | Path) -> tuple[Built, dict[str, Path]]:
    """Load the transcoders, build the graph of ``prompt`` and write it at ``out`` under a lock on its folder (what
    ``saescope graph`` and the app's Graph page do)."""
    from .. import lock
    from .build import build_graph, load_dictionaries

    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"the graph file must be a .json file, got {out}")
    transcoders = load_dictionaries(transcoders_dir)
    built = build_graph(lm, transcoders, prompt, cfg)
    with lock.hold(out.parent, name=f".{out.stem}.lock"):
        paths = write_graph(built, out, scan=Path(transcoders_dir).name,
                            sources={"model": lm.name, "transcoders": str(Path(transcoders_dir).resolve())})
    return built, paths
