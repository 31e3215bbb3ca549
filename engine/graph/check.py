"""The honest part of issue 25 item 4: for a graph's most influential feature nodes, what ablating the feature in the
*real* model does to the first target's logit (attention, norms and every MLP free to respond) beside what the graph
predicts (its direct edge: the change in the frozen replacement model with the other writes held). Reported side by
side, never asserted equal: the gap is what the local replacement model leaves out."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..model.hooks import interventions
from ..model.loading import LoadedModel
from ..saes.clt import CrossLayerTranscoder
from ..saes.transcoders import Transcoder
from .build import Built


@dataclass(frozen=True)
class ClampCheck:
    """One feature node ablated (its activation set to 0 at its layer and position)."""

    node_id: str
    influence: float
    predicted: float
    """Change of the target's logit (demeaned / difference direction) by the graph: ``-A[target, feature]``."""
    real: float
    """The same change in the real model, the feature's write removed from its MLP's output."""


def _target_value(logits: torch.Tensor, vector_in_vocab: torch.Tensor) -> float:
    return float(logits @ vector_in_vocab)


def feature_writes(transcoders: dict[int, Transcoder] | CrossLayerTranscoder, layer: int, latent: int,
                   activation: float) -> dict[int, torch.Tensor]:
    """Layer -> what feature ``latent`` of ``layer`` at ``activation`` writes to that layer's MLP output (one layer for
    a per-layer transcoder, that layer and every later one for a cross-layer transcoder)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        rows = transcoders.W_dec[layer][latent]  # [n_layers - layer, d]
        return {layer + j: activation * rows[j].float() for j in range(rows.shape[0])}
    return {layer: activation * transcoders[layer].W_dec[latent].float()}


@torch.no_grad()
def clamp_checks(lm: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, built: Built,
                 top: int = 10) -> list[ClampCheck]:
    """Ablate each of the ``top`` most influential feature nodes in the real model, one at a time."""
    g, p = built.graph, built.pruned
    if g.n_features == 0:
        return []
    ids = torch.tensor(g.ids)[None]
    weights = g.targets.logit_weights(0, int(lm.unembed_matrix().shape[0]))
    base = _target_value(lm.logits(ids)[0, -1].float().cpu(), weights)
    order = p.influence[:g.n_features].argsort(descending=True)[:top]
    checks: list[ClampCheck] = []
    for i in order.tolist():
        layer, pos, latent = g.features[i].tolist()
        writes = feature_writes(transcoders, layer, latent, float(g.activations[i]))

        def ablate(out: torch.Tensor, pos: int = pos, write: torch.Tensor | None = None) -> torch.Tensor:
            assert write is not None
            out = out.clone()
            out[:, pos] -= write.to(device=out.device, dtype=out.dtype)
            return out

        pairs = [(f"blocks.{at}.hook_mlp_out", functools.partial(ablate, write=w)) for at, w in writes.items()]
        with interventions(lm.hooks, pairs):
            real = _target_value(lm.logits(ids)[0, -1].float().cpu(), weights) - base
        checks.append(ClampCheck(f"{layer}_{latent}_{pos}", float(p.influence[i]),
                                 -float(g.adjacency[g.logit_start, i]), real))
    return checks


@torch.no_grad()
def ablation_preview(lm: LoadedModel, transcoder: Transcoder, ids: list[int], pos: int, latent: int, activation: float,
                     top: int = 5) -> dict[str, list[tuple[int, float]]]:
    """The next-token distribution's top tokens (id, probability) after the prompt ``ids``: clean, with the feature's
    write removed at ``pos`` (attention free), and the same with every attention pattern frozen at the clean one."""
    from .frozen import adapter_for, intervened_logits, record

    adapter = adapter_for(lm)
    rec = record(adapter, torch.tensor(ids))
    delta = torch.zeros_like(rec.embed)
    delta[pos] = -activation * transcoder.W_dec[latent].float().to(delta.device)
    layer = transcoder.layer
    runs = {"clean": rec.final[-1] @ lm.unembed_matrix().float().T,
            "ablated": intervened_logits(adapter, rec, {layer: delta}, freeze_attention=False)[-1],
            "ablated, attention frozen": intervened_logits(adapter, rec, {layer: delta}, freeze_attention=True)[-1]}
    out: dict[str, list[tuple[int, float]]] = {}
    for name, logits in runs.items():
        probs = logits.float().softmax(-1).cpu()
        values, idx = probs.topk(top)
        out[name] = list(zip(idx.tolist(), values.tolist(), strict=True))
    return out
