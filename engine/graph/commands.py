"""The ``saescope graph`` command (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import configs
from ..model.commands import load_cli_model, model_arguments


def cmd_graph(args: argparse.Namespace) -> int:
    from .build import GraphConfig, load_dictionaries
    from .files import make_graph, slug_of

    cfg = configs.from_args(GraphConfig, args)
    out = Path(args.out or f"{slug_of(args.prompt)}.json")
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {out}")
    load_dictionaries(args.transcoders)  # refuse a bad folder before loading the model
    lm = load_cli_model(args.model, args.device, args.dtype)
    built, paths = make_graph(lm, args.transcoders, args.prompt, cfg, out)
    g = built.graph
    summary = {
        "out": str(paths["json"]), "nodes": str(paths["nodes"]), "edges": str(paths["edges"]),
        "tokens": len(g.ids), "active_features": g.n_active, "feature_nodes": g.n_features,
        "kept_nodes": int(built.pruned.node_mask.sum()), "kept_edges": int(built.pruned.edge_mask.sum()),
        "targets": g.targets.labels, "replacement_score": round(built.scores.replacement, 4),
        "completeness_score": round(built.scores.completeness, 4),
        "timings_s": {k: round(v, 3) for k, v in g.timings.items()},
    }
    if args.check_top:
        from .check import clamp_checks

        summary["clamp_checks"] = [
            {"node": c.node_id, "influence": round(c.influence, 4), "graph_direct": round(c.predicted, 4),
             "real_model": round(c.real, 4)}
            for c in clamp_checks(lm, load_dictionaries(args.transcoders), built, args.check_top)]
    if g.missing_layers:
        summary["missing_layers"] = g.missing_layers
        summary["note"] = (f"no transcoder for layer(s) {', '.join(map(str, g.missing_layers))}: each of their MLPs "
                           "is one error node per position")
    print(json.dumps(summary, indent=2))
    return 0


def add_parsers(sub) -> None:
    from .build import GraphConfig

    p = sub.add_parser("graph", help="attribution graph of one prompt over per-layer transcoders (circuit-tracer's)")
    model_arguments(p)
    p.add_argument("--transcoders", required=True,
                   help="folder of per-layer transcoders (SAELens folders or circuit-tracer layer_<L>.safetensors), or "
                        "a cross-layer transcoder in circuit-tracer's layout (W_enc_<i>/W_dec_<i>.safetensors)")
    p.add_argument("--prompt", required=True, help="the prompt whose next token is attributed")
    p.add_argument("--out", default="", help="graph JSON to write (Neuronpedia's format); <stem>.nodes.parquet and "
                   "<stem>.edges.parquet go beside it (default: graph-<hash of the prompt>.json here)")
    configs.add_arguments(p, GraphConfig)
    p.add_argument("--check-top", type=int, default=0, metavar="N",
                   help="also ablate the N most influential features in the real model and print each one's effect on "
                        "the first target beside the graph's direct edge (reported, not asserted; docs/graphs.md)")
    p.set_defaults(func=cmd_graph)
