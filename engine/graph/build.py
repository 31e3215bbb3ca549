"""One graph from a prompt: the settings, the checks on bad input, the targets, attribution and pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.loading import LoadedModel
from ..model.tokens import display_tokens
from ..saes.clt import CrossLayerTranscoder, check_clt_fits, is_clt_folder, load_clt
from ..saes.transcoders import INPUT_HOOK, OUTPUT_HOOK, Transcoder, check_fits, load_transcoders
from .attribution import Graph, Targets, attribute, salient_logits
from .prune import Pruned, Scores, prune, scores


@dataclass(frozen=True)
class GraphConfig:
    """How one attribution graph is built (circuit-tracer's defaults unless said)."""

    target: str = ""
    """Attribute this one next token (its text; it must be a single token) instead of the top logits."""
    target_diff: str = ""
    """Attribute the logit difference A - B of two single tokens, given as ``A,B`` (spaces kept: ``' Paris, Rome'``),
    instead of the top logits."""
    max_logits: int = 10
    """At most this many top logits become targets."""
    logit_probability: float = 0.95
    """Top logits are taken until their probabilities sum to this."""
    max_feature_nodes: int = 2000
    """Feature nodes that get their own row (the most influential first, estimated as rows arrive)."""
    batch_size: int = 128
    """Targets per backward pass."""
    node_threshold: float = 0.8
    """Pruning keeps the nodes covering this fraction of the influence on the targets."""
    edge_threshold: float = 0.98
    """Pruning keeps the edges covering this fraction of the influence."""
    max_tokens: int = 64
    """Refuse prompts longer than this many tokens (the cost grows with positions times features)."""

    def __post_init__(self) -> None:
        if self.target and self.target_diff:
            raise ValueError("give either --target or --target-diff, not both")
        if self.target_diff and len(self.diff_pair) != 2:
            raise ValueError(f"--target-diff takes two tokens A,B; got {self.target_diff!r}")
        for name in ("max_logits", "max_feature_nodes", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("logit_probability", "node_threshold", "edge_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def diff_pair(self) -> list[str]:
        return self.target_diff.split(",")


@dataclass(frozen=True)
class Built:
    """A graph, its pruning and its scores, with the display strings of its tokens."""

    graph: Graph
    pruned: Pruned
    scores: Scores
    token_texts: list[str]
    config: GraphConfig


def single_token(lm: LoadedModel, text: str) -> int:
    """The id of ``text`` as exactly one token, or a ValueError saying how it tokenizes."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        shown = display_tokens(lm.tokenizer, ids)
        raise ValueError(f"target {text!r} is not one token: it tokenizes as {len(ids)} ({shown})")
    return int(ids[0])


def prompt_ids(lm: LoadedModel, prompt: str, max_tokens: int) -> torch.Tensor:
    """The prompt's token ids (as the tokenizer adds special tokens), refused when empty or over ``max_tokens``."""
    ids = lm.tokenizer(prompt)["input_ids"]
    if not prompt or not ids:
        raise ValueError("the prompt is empty")
    if len(ids) > max_tokens:
        raise ValueError(f"the prompt is {len(ids)} tokens, over the cap of {max_tokens} (--max-tokens)")
    return torch.tensor(ids, dtype=torch.long)


def target_picker(lm: LoadedModel, cfg: GraphConfig):
    """``final [pos, d] -> Targets`` for the config's target choice (token ids resolved now, so a bad one fails
    before any forward)."""
    W_U = lm.unembed_matrix().detach().float().cpu()
    if cfg.target_diff:
        first, second = cfg.diff_pair
        a, b = single_token(lm, first), single_token(lm, second)
        label = f"{first} - {second}"
        return lambda final: Targets([a], [label], torch.ones(1), (W_U[a] - W_U[b])[None], [b])
    if cfg.target:
        t = single_token(lm, cfg.target)
        return lambda final: Targets([t], [cfg.target], torch.ones(1), (W_U[t] - W_U.mean(0))[None])

    def top(final: torch.Tensor) -> Targets:
        ids, probs, vecs = salient_logits(final[-1].cpu(), W_U, cfg.max_logits, cfg.logit_probability)
        return Targets(ids, display_tokens(lm.tokenizer, ids), probs, vecs)

    return top


Dictionaries = dict[int, Transcoder] | CrossLayerTranscoder
"""What a graph replaces the MLPs with: per-layer transcoders, or one cross-layer transcoder."""


def load_dictionaries(path) -> Dictionaries:
    """A folder of per-layer transcoders, or a cross-layer transcoder in circuit-tracer's layout."""
    return load_clt(path) if is_clt_folder(path) else load_transcoders(path)


def check_dictionaries(lm: LoadedModel, transcoders: Dictionaries) -> None:
    """Refuse transcoders that do not fit the model (one line)."""
    widths = {h: lm.hook_width(h) for h in lm.hook_points()}
    if not isinstance(transcoders, CrossLayerTranscoder):
        check_fits(transcoders, lm.hook_points(), widths)
        return
    if (transcoders.input_hook, transcoders.output_hook) != (INPUT_HOOK, OUTPUT_HOOK):
        raise ValueError(f"a graph over a cross-layer transcoder needs features that read {INPUT_HOOK} and write "
                         f"{OUTPUT_HOOK}; this one reads {transcoders.input_hook} and writes {transcoders.output_hook}")
    check_clt_fits(transcoders, lm.hook_points(), widths)


def build_graph(lm: LoadedModel, transcoders: Dictionaries, prompt: str, cfg: GraphConfig) -> Built:
    """Check the inputs, attribute, prune and score."""
    check_dictionaries(lm, transcoders)
    ids = prompt_ids(lm, prompt, cfg.max_tokens)
    pick = target_picker(lm, cfg)
    graph = attribute(lm, transcoders, ids, prompt, pick, max_feature_nodes=cfg.max_feature_nodes,
                      batch_size=cfg.batch_size)
    import time

    start = time.perf_counter()
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    graph_scores = scores(graph)
    graph.timings["prune_s"] = time.perf_counter() - start
    return Built(graph, pruned, graph_scores, display_tokens(lm.tokenizer, graph.ids), cfg)
