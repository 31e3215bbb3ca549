"""Steering and ablating graph nodes: with attention frozen the target logits move by exactly the graph's edges
(which came from backward passes), multiplier 1 is a no-op, and with attention free the result is a Hugging Face
forward with the same vector added at the MLP's output through saescope's hooks, continuation included."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.graph.interventions import Steer, expand, steer
from engine.graph.supernodes import Supernode
from engine.model.tiny import tiny_model

from .graph_util import PROMPT, full_graph, random_set


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param)


def _ids(lm) -> list[int]:
    return lm.tokenizer(PROMPT)["input_ids"]


def _node_id(features: torch.Tensor, i: int) -> str:
    layer, pos, latent = features[i].tolist()
    return f"{layer}_{latent}_{pos}"


def _strongest(g, n: int) -> list[int]:
    """The ``n`` feature nodes with the largest direct edges into the first target, at distinct layer/positions."""
    order = g.adjacency[g.logit_start, :g.n_features].abs().argsort(descending=True).tolist()
    return order[:n]


def _greedy(lm, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Brute force: the Hugging Face forward over the whole sequence per token (hooks active in the caller)."""
    seq = list(ids)
    first = None
    for _ in range(n):
        logits = lm.logits(torch.tensor([seq]))[0, -1].float()
        first = logits if first is None else first
        seq.append(int(logits.argmax()))
    assert first is not None
    return first, seq[len(ids):]


@pytest.mark.parametrize("skip", [False, True])
def test_frozen_steering_moves_the_targets_by_the_edges(lm, skip):
    """A supernode of two nodes ablated and a third node tripled: each target logit (demeaned) of the local
    replacement model moves by ``sum (m - 1) A[target, node]``, the edges of the graph's backward passes."""
    transcoders = random_set(lm, skip=skip)
    g = full_graph(lm, transcoders).graph
    a, b, c = _strongest(g, 3)
    group = Supernode("S1", "pair", (_node_id(g.features, a), _node_id(g.features, b)))
    steers = expand({"S1": 0.0, _node_id(g.features, c): 3.0}, [group])
    assert [s.multiplier for s in steers] == [0.0, 0.0, 3.0]
    result = steer(lm, transcoders, _ids(lm), steers, new_tokens=1)
    assert result.frozen is not None
    vocab = int(result.clean.logits.shape[0])
    for j in range(len(g.targets.tokens)):
        weights = g.targets.logit_weights(j, vocab)
        moved = (result.frozen.logits - result.clean.logits) @ weights
        predicted = -g.adjacency[g.logit_start + j, a] - g.adjacency[g.logit_start + j, b] \
            + 2.0 * g.adjacency[g.logit_start + j, c]
        torch.testing.assert_close(moved, predicted, atol=1e-4, rtol=1e-4)
    assert (result.frozen.logits - result.clean.logits).abs().max() > 1e-3


def test_multiplier_one_changes_nothing(lm):
    transcoders = random_set(lm)
    g = full_graph(lm, transcoders).graph
    steers = [Steer(_node_id(g.features, i), 1.0) for i in _strongest(g, 3)]
    result = steer(lm, transcoders, _ids(lm), steers, new_tokens=4)
    clean_logits, clean_tokens = _greedy(lm, _ids(lm), 4)
    assert result.frozen is not None
    for outcome in (result.clean, result.free, result.frozen):
        torch.testing.assert_close(outcome.logits, clean_logits, atol=1e-4, rtol=1e-4)
        assert outcome.continuation == clean_tokens


def test_free_steering_is_a_hooked_forward(lm):
    """Attention free: the Hugging Face model with ``(m - 1) a W_dec`` added at the prompt position of each node's
    MLP output (``a`` read off the transcoder applied to the captured MLP input), generating greedily."""
    transcoders = random_set(lm)
    g = full_graph(lm, transcoders).graph
    picked = _strongest(g, 2)
    multipliers = [0.0, 4.0]
    ids = _ids(lm)
    steers = [Steer(_node_id(g.features, i), m) for i, m in zip(picked, multipliers, strict=True)]
    result = steer(lm, transcoders, ids, steers, new_tokens=5, freeze_attention=False)
    assert result.frozen is None

    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for i, m in zip(picked, multipliers, strict=True):
        layer, pos, latent = g.features[i].tolist()
        hook = f"blocks.{layer}.ln2.hook_normalized"
        h = lm.capture(torch.tensor([ids]), hook)[hook][0].float()
        _, codes = transcoders[layer](h)
        by_layer.setdefault(layer, []).append((pos, (m - 1.0) * codes[pos, latent] * transcoders[layer].W_dec[latent]))

    def adder(items):
        def add(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for pos, vector in items:
                out[:, pos] += vector.to(out.dtype)
            return out
        return add

    with contextlib.ExitStack() as stack:
        for layer, items in by_layer.items():
            stack.enter_context(lm.hooks.intervene(f"blocks.{layer}.hook_mlp_out", adder(items)))
        hooked_logits, hooked_tokens = _greedy(lm, ids, 5)
    torch.testing.assert_close(result.free.logits, hooked_logits, atol=1e-4, rtol=1e-4)
    assert result.free.continuation == hooked_tokens
    assert not torch.allclose(result.free.logits, result.clean.logits, atol=1e-3)


def test_bad_steers_are_refused(lm):
    transcoders = random_set(lm, layers=[1])
    g = full_graph(lm, transcoders).graph
    layer, pos, latent = g.features[0].tolist()
    active = set(map(tuple, g.features.tolist()))
    idle = next(x for x in range(96) if (layer, pos, x) not in active)
    with pytest.raises(ValueError, match="not active on this prompt"):
        steer(lm, transcoders, _ids(lm), [Steer(f"{layer}_{idle}_{pos}", 0.0)])
    with pytest.raises(ValueError, match="not a feature node"):
        steer(lm, transcoders, _ids(lm), [Steer("E_5_0", 0.0)])
    with pytest.raises(ValueError, match="no transcoder for layer 0"):
        steer(lm, transcoders, _ids(lm), [Steer(f"0_{latent}_{pos}", 0.0)])
    with pytest.raises(ValueError, match="pin at least one"):
        steer(lm, transcoders, _ids(lm), [])
