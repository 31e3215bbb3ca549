"""Edges of the local replacement model by batched backward passes (circuit-tracer's ``attribute``).

Nodes, in the order of the adjacency matrix: the selected active features (layer, position, latent), error nodes
(layer-major, one per layer and position: the true MLP output minus the transcoder's output; a layer without a
transcoder is all error), token embeddings (one per position), then the targets (logits). ``A[t, s]`` is the direct
effect of source ``s`` on target ``t``'s input: the gradient of the target's input (a feature's pre-activation
``h_L @ W_enc[:, i]`` without ``b_enc``, or a logit direction on the final norm's output) with respect to the stream
where ``s`` writes, dotted with what ``s`` writes (``a_s * W_dec[s]``, the error vector, the embedding). Gradients
never pass through MLP writes (they are leaves), so every path is direct. Biases (``b_dec``, ``b_enc``, norm and
attention biases) belong to no node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..model.loading import LoadedModel
from ..saes.clt import CrossLayerTranscoder
from ..saes.transcoders import Transcoder
from .frozen import Adapter, Recorded, adapter_for, frozen_forward, record


@dataclass(frozen=True)
class Targets:
    """The logit nodes: what each reads from the final norm's output at the last position."""

    tokens: list[int]
    """Vocabulary ids (for a logit difference, the first token's)."""
    labels: list[str]
    probabilities: torch.Tensor
    """The weight of each target in influence (its probability; 1 for a custom target)."""
    vectors: torch.Tensor
    """``[n_targets, d]``."""
    minus: list[int | None] | None = None
    """Per target, the token subtracted by a logit difference (None: the logit minus the mean logit)."""

    def logit_weights(self, j: int, vocab: int) -> torch.Tensor:
        """``[vocab]``: target ``j`` as a combination of the logits (what ``vectors[j]`` reads through ``W_U``)."""
        weights = torch.zeros(vocab)
        second = self.minus[j] if self.minus else None
        if second is None:
            weights -= 1.0 / vocab
        else:
            weights[second] -= 1.0
        weights[self.tokens[j]] += 1.0
        return weights


@dataclass
class Graph:
    """An unpruned attribution graph (circuit-tracer's layout; see the module docstring)."""

    prompt: str
    ids: list[int]
    n_layers: int
    features: torch.Tensor
    """``[n_selected, 3]`` (layer, position, latent) of the selected features."""
    activations: torch.Tensor
    """``[n_selected]``."""
    n_active: int
    """Active features before the ``max_feature_nodes`` cap."""
    targets: Targets
    adjacency: torch.Tensor
    """``[n_nodes, n_nodes]``: rows targets, columns sources."""
    missing_layers: list[int]
    """Layers without a transcoder: their MLP is only error nodes."""
    timings: dict[str, float] = field(default_factory=dict[str, float])

    @property
    def n_pos(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos


def salient_logits(final: torch.Tensor, W_U: torch.Tensor, max_logits: int, probability: float) -> tuple[
        list[int], torch.Tensor, torch.Tensor]:
    """The fewest top tokens whose probability sums to ``probability`` (at most ``max_logits``): ids, probabilities,
    demeaned unembedding rows ``W_U[t] - mean_v W_U[v]`` (the gradient of ``logit_t - mean logit``)."""
    probs = (final @ W_U.T).softmax(-1)
    top_p, top_idx = probs.topk(min(max_logits, probs.shape[-1]))
    keep = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(probability))) + 1
    top_p, top_idx = top_p[:keep], top_idx[:keep]
    return top_idx.tolist(), top_p, W_U[top_idx] - W_U.mean(0, keepdim=True)


@dataclass(frozen=True)
class Setup:
    """A prompt's real forward, its active features and error vectors, ready for backward passes."""

    adapter: Adapter
    rec: Recorded
    features: torch.Tensor
    """``[n_active, 3]`` (layer, position, latent), layer-major."""
    activations: torch.Tensor
    writes_to: list[tuple[torch.Tensor, torch.Tensor]]
    """Per output layer L: (indices of the active features that write to L's MLP output, what each writes there
    ``[n, d]``: ``a * W_dec[latent]``). A per-layer transcoder's features write to their own layer only; a
    cross-layer transcoder's to their layer and every later one."""
    encoder: torch.Tensor
    """``[n_active, d]``: ``W_enc[:, latent]``, what each reads from its layer's MLP input."""
    errors: torch.Tensor
    """``[n_layers, pos, d]``."""
    writes: list[torch.Tensor]
    """Per layer: what replaces the MLP's output in the frozen model (true output minus the skip path)."""
    skips: dict[int, torch.Tensor]
    missing_layers: list[int]


@torch.no_grad()
def setup(lm: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, ids: torch.Tensor) -> Setup:
    """Run the prompt for real and read off the transcoders' active features and errors."""
    adapter = adapter_for(lm)
    rec = record(adapter, ids)
    if isinstance(transcoders, CrossLayerTranscoder):
        return _setup_clt(adapter, rec, transcoders)
    feats: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []
    dec: list[torch.Tensor] = []
    enc: list[torch.Tensor] = []
    errors: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    skips: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    for layer in range(len(adapter.blocks)):
        h, out = rec.mlp_in[layer], rec.mlp_out[layer]
        tc = transcoders.get(layer)
        if tc is None:
            missing.append(layer)
            errors.append(out)
            writes.append(out)
            continue
        tc = tc.to(torch.float32)
        recon, codes = tc(h)
        pos, latent = codes.nonzero(as_tuple=True)
        a = codes[pos, latent]
        feats.append(torch.stack([torch.full_like(pos, layer), pos, latent], 1).cpu())
        acts.append(a.cpu())
        dec.append(a[:, None] * tc.W_dec[latent])
        enc.append(tc.W_enc[:, latent].T)
        errors.append(out - recon)
        if tc.W_skip is not None:
            skips[layer] = tc.W_skip
            writes.append(out - h @ tc.W_skip.T)
        else:
            writes.append(out)
    d = rec.embed.shape[-1]
    features = torch.cat(feats) if feats else torch.zeros(0, 3, dtype=torch.long)
    decoder = torch.cat(dec) if dec else torch.zeros(0, d)
    writes_to = []
    for layer in range(len(adapter.blocks)):
        idx = (features[:, 0] == layer).nonzero().flatten()
        writes_to.append((idx, decoder[idx.to(decoder.device)]))
    return Setup(adapter, rec, features, torch.cat(acts) if acts else torch.zeros(0), writes_to,
                 torch.cat(enc) if enc else torch.zeros(0, d), torch.stack(errors), writes, skips, missing)


def _setup_clt(adapter: Adapter, rec: Recorded, clt: CrossLayerTranscoder) -> Setup:
    """A cross-layer transcoder's features: layer l's read l's MLP input and write to the MLP outputs of l..n-1; each
    layer's error is its true MLP output minus everything the CLT writes there (``clt.outputs``)."""
    n_layers = len(adapter.blocks)
    if clt.n_layers != n_layers:
        raise ValueError(f"the cross-layer transcoder has {clt.n_layers} layers, the model {n_layers}")
    codes = [clt.encode(layer, rec.mlp_in[layer]) for layer in range(n_layers)]
    recon = clt.outputs(codes)
    feats, acts, enc, owners = [], [], [], []
    for layer, c in enumerate(codes):
        pos, latent = c.nonzero(as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, layer), pos, latent], 1).cpu())
        acts.append(c[pos, latent])
        enc.append(clt.W_enc[layer][:, latent].T)
    features = torch.cat(feats)
    activations = torch.cat(acts)
    start = 0
    for f in feats:
        owners.append(torch.arange(start, start + len(f)))
        start += len(f)
    writes_to = []
    for out_layer in range(n_layers):
        idx = torch.cat([owners[src] for src in range(out_layer + 1)])
        rows = [activations[owners[src]][:, None] * clt.W_dec[src][features[owners[src], 2], out_layer - src]
                for src in range(out_layer + 1)]
        writes_to.append((idx, torch.cat(rows)))
    errors = torch.stack([rec.mlp_out[layer] - recon[layer] for layer in range(n_layers)])
    return Setup(adapter, rec, features, activations.cpu(), writes_to, torch.cat(enc), errors, list(rec.mlp_out), {},
                 [])


class Rows:
    """One frozen forward with gradients; ``rows(...)`` gives a batch of adjacency rows per backward pass."""

    def __init__(self, s: Setup):
        self.s = s
        self.embed = s.rec.embed.clone().requires_grad_(True)
        self.writes = [w.clone().requires_grad_(True) for w in s.writes]
        with torch.enable_grad():
            self.hs, self.final = frozen_forward(s.adapter, s.rec, self.embed, self.writes, s.skips)
        self.n_layers, self.n_pos = len(self.writes), int(s.rec.embed.shape[0])
        # each layer's active decoder rows laid out [pos, slot, d] (slot: rank among the features active at that
        # layer and position), so one batched matmul per layer contracts every gradient with its own position's rows
        self.layer_slices: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        self.padded: list[torch.Tensor] = []
        d, device = s.rec.embed.shape[-1], s.rec.embed.device
        for layer in range(self.n_layers):
            idx, rows = s.writes_to[layer]
            pos = s.features[idx, 1]
            counts = torch.bincount(pos, minlength=self.n_pos)
            starts = counts.cumsum(0) - counts
            order = pos.argsort(stable=True)
            slot = torch.empty_like(pos)
            slot[order] = torch.arange(len(pos)) - starts[pos[order]]
            padded = torch.zeros(self.n_pos, int(counts.max()) if len(pos) else 0, d)
            padded[pos, slot] = rows.cpu()
            self.layer_slices.append(idx)
            self.slots.append(slot.to(device))
            self.padded.append(padded.to(device))
        self.feature_pos = s.features[:, 1].to(device)

    def rows(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``[batch, n_active + n_layers*pos + pos]``: direct effects on targets that read ``vectors [batch, d]`` at
        ``(layer, position)`` (layer ``n_layers`` = the final norm's output) from every feature, error and token."""
        batch = int(layers.shape[0])
        top = int(layers.max())
        device = self.final.device
        vectors, positions = vectors.to(device), positions.to(device)
        layers = layers.to(device)
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for layer in sorted(set(layers.tolist())):
            which = (layers == layer).nonzero().flatten()
            out = self.final if layer == self.n_layers else self.hs[layer]
            g = torch.zeros(batch, *out.shape, device=device)
            g[which, positions[which]] = vectors[which]
            outputs.append(out)
            grads.append(g)
        inputs = [self.embed, *self.writes[:top]]
        got = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, is_grads_batched=True, allow_unused=True)
        g_embed = got[0]
        g_writes = list(got[1:])
        s = self.s
        feature_part = torch.zeros(batch, int(s.features.shape[0]), device=device)
        error_part = torch.zeros(batch, self.n_layers, self.n_pos, device=device)
        for layer, g in enumerate(g_writes):
            if g is None:
                continue
            idx = self.layer_slices[layer]
            if len(idx):
                per_pos = torch.bmm(g.transpose(0, 1), self.padded[layer].transpose(1, 2))  # [pos, batch, slot]
                # a cross-layer feature writes to several layers: its effects through each add up
                feature_part[:, idx.to(device)] += per_pos[self.feature_pos[idx.to(device)], :, self.slots[layer]].T
            error_part[:, layer] = torch.einsum("bpd,pd->bp", g, s.errors[layer])
        token_part = (torch.einsum("bpd,pd->bp", g_embed, s.rec.embed) if g_embed is not None
                      else torch.zeros(batch, self.n_pos, device=device))
        return torch.cat([feature_part, error_part.flatten(1), token_part], 1).cpu()


def partial_influence(edges: torch.Tensor, logit_p: torch.Tensor, row_node: torch.Tensor, max_iter: int = 128
                      ) -> torch.Tensor:
    """Influence on the targets of every node, from the rows computed so far (circuit-tracer's estimate that orders
    which features get rows when they are capped)."""
    norm = edges.abs()
    norm /= norm.sum(1, keepdim=True).clamp(min=1e-8)
    influence = torch.zeros(edges.shape[1])
    prod = torch.zeros(edges.shape[1])
    prod[-len(logit_p):] = logit_p
    for _ in range(max_iter):
        prod = prod[row_node] @ norm
        if not prod.any():
            return influence
        influence += prod
    raise RuntimeError("the influence estimate did not converge")


def attribute(lm: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, ids: torch.Tensor, prompt: str,
              targets_of,
              *, max_feature_nodes: int = 2000, batch_size: int = 128, update_interval: int = 4) -> Graph:
    """The unpruned graph of ``ids [pos]``; ``targets_of(final [pos, d]) -> Targets`` picks the logit nodes."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    s = setup(lm, transcoders, ids)
    targets: Targets = targets_of(s.rec.final)
    rows = Rows(s)
    timings["forward_s"] = time.perf_counter() - start
    n_active, n_layers, n_pos = int(s.features.shape[0]), rows.n_layers, rows.n_pos
    n_logits = len(targets.tokens)
    logit_offset = n_active + (n_layers + 1) * n_pos
    n_selected = min(max_feature_nodes, n_active)
    edges = torch.zeros(n_selected + n_logits, logit_offset + n_logits)
    row_node = torch.zeros(n_selected + n_logits, dtype=torch.long)

    start = time.perf_counter()
    for i in range(0, n_logits, batch_size):
        vec = targets.vectors[i:i + batch_size]
        b = vec.shape[0]
        edges[i:i + b, :logit_offset] = rows.rows(torch.full((b,), n_layers), torch.full((b,), n_pos - 1), vec)
        row_node[i:i + b] = torch.arange(i, i + b) + logit_offset
    timings["logit_rows_s"] = time.perf_counter() - start

    start = time.perf_counter()
    visited = torch.zeros(n_active, dtype=torch.bool)
    filled, n_visited = n_logits, 0
    while n_visited < n_selected:
        if n_selected == n_active:
            pending = torch.arange(n_active)
        else:
            influence = partial_influence(edges[:filled], targets.probabilities, row_node[:filled])
            rank = influence[:n_active].argsort(descending=True)
            pending = rank[~visited[rank]][:min(update_interval * batch_size, n_selected - n_visited)]
        # later layers first: a batch's backward pass only goes down from its highest layer
        pending = pending[s.features[pending, 0].argsort(descending=True, stable=True)]
        for chunk in pending.split(batch_size):
            b = len(chunk)
            f = s.features[chunk]
            edges[filled:filled + b, :logit_offset] = rows.rows(f[:, 0], f[:, 1], s.encoder[chunk.to(s.encoder.device)])
            row_node[filled:filled + b] = chunk
            visited[chunk] = True
            filled += b
            n_visited += b
    timings["feature_rows_s"] = time.perf_counter() - start

    selected = visited.nonzero().flatten()
    if n_selected < n_active:
        edges = edges[:, torch.cat([selected, torch.arange(n_active, logit_offset + n_logits)])]
    order = row_node.argsort()  # features by their index, then the logits
    edges = edges[order]
    n_nodes = edges.shape[1]
    adjacency = torch.zeros(n_nodes, n_nodes)
    adjacency[:n_selected] = edges[:n_selected]
    adjacency[n_nodes - n_logits:] = edges[n_selected:]
    return Graph(prompt, ids.tolist(), n_layers, s.features[selected], s.activations[selected], n_active, targets,
                 adjacency, s.missing_layers, timings)
