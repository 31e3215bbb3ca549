"""Random TopK transcoders and graphs on tiny random models, shared by the graph tests."""

from __future__ import annotations

import torch

from engine.graph.build import Built, GraphConfig, build_graph
from engine.model.loading import LoadedModel
from engine.saes.transcoders import Transcoder

PROMPT = "The quick brown fox jumps over"


def random_transcoder(layer: int, d: int, d_sae: int = 96, k: int = 6, seed: int = 0, skip: bool = False) -> Transcoder:
    g = torch.Generator().manual_seed(1000 * seed + layer)
    return Transcoder(torch.randn(d, d_sae, generator=g) / d ** 0.5, torch.randn(d_sae, generator=g) * 0.1,
                      torch.randn(d_sae, d, generator=g) / d_sae ** 0.5, torch.randn(d, generator=g) * 0.1,
                      f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", k=k,
                      W_skip=torch.randn(d, d, generator=g) * 0.05 if skip else None)


def random_set(lm: LoadedModel, layers: list[int] | None = None, **kwargs) -> dict[int, Transcoder]:
    return {layer: random_transcoder(layer, lm.d_model, **kwargs)
            for layer in (range(lm.n_layers) if layers is None else layers)}


def full_graph(lm: LoadedModel, transcoders: dict[int, Transcoder], **cfg) -> Built:
    """A graph where every active feature gets a row."""
    return build_graph(lm, transcoders, PROMPT, GraphConfig(max_feature_nodes=10 ** 6, **cfg))
