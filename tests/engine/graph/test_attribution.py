"""Exactness of the local replacement model (issue 25 item 4), checked against the real Hugging Face forward and
against forwards of the frozen model, never against the backward passes that built the edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.graph.frozen import adapter_for, frozen_forward, record
from engine.model.tiny import tiny_model

from .graph_util import PROMPT, full_graph, random_set


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def lm(request):
    return tiny_model(request.param)


def _ids(lm):
    return torch.tensor(lm.tokenizer(PROMPT)["input_ids"])


def _constant_part(lm, transcoders, ids):
    """The frozen model's stream with every node silenced: only biases (b_dec, norm and attention biases) remain."""
    adapter = adapter_for(lm)
    rec = record(adapter, ids)
    pos, d = rec.embed.shape
    writes = [transcoders[layer].b_dec.expand(pos, d) if layer in transcoders else torch.zeros(pos, d)
              for layer in range(lm.n_layers)]
    skips = {layer: tc.W_skip for layer, tc in transcoders.items() if tc.W_skip is not None}
    return frozen_forward(adapter, rec, torch.zeros(pos, d), writes, skips)


def test_written_out_forward_is_the_real_one(lm):
    ids = _ids(lm)
    rec = record(adapter_for(lm), ids)
    real = lm.logits(ids[None])[0].float()
    torch.testing.assert_close(rec.final @ lm.unembed_matrix().float().T, real, atol=1e-5, rtol=1e-5)
    hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(lm.n_layers)]
    captured = lm.capture(ids[None], hooks)
    for layer, hook in enumerate(hooks):
        torch.testing.assert_close(rec.mlp_in[layer], captured[hook][0].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_contributions_sum_to_each_input(lm, skip):
    """Each feature's pre-activation (from the real model's MLP input) and each target logit (from the real logits)
    equal the sum of their direct contributions plus the bias-only part."""
    transcoders = random_set(lm, skip=skip)
    built = full_graph(lm, transcoders)
    g = built.graph
    assert g.n_features == g.n_active > 0
    ids = _ids(lm)
    hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(lm.n_layers)]
    h = lm.capture(ids[None], hooks)
    hs0, final0 = _constant_part(lm, transcoders, ids)
    for row, (layer, pos, latent) in enumerate(g.features.tolist()):
        w = transcoders[layer].W_enc[:, latent]
        want = h[hooks[layer]][0, pos].float() @ w
        got = g.adjacency[row].sum() + hs0[layer][pos] @ w
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    logits = lm.logits(ids[None])[0, -1].float()
    assert len(g.targets.tokens) >= 1 and g.targets.probabilities.sum() <= 1.0
    for j, token in enumerate(g.targets.tokens):
        got = g.adjacency[g.logit_start + j].sum() + final0[-1] @ g.targets.vectors[j]
        torch.testing.assert_close(got, logits[token] - logits.mean(), atol=2e-4, rtol=1e-4)


def test_targets_are_the_top_logits(lm):
    built = full_graph(lm, random_set(lm))
    probs = lm.logits(_ids(lm)[None])[0, -1].float().softmax(-1)
    order = probs.argsort(descending=True)
    n = len(built.graph.targets.tokens)
    assert built.graph.targets.tokens == order[:n].tolist()
    assert n == 10 or probs[order[:n]].sum() >= 0.95 > probs[order[:n - 1]].sum()


def test_intervention_moves_downstream_nodes_as_the_edges_say(lm):
    """Scaling one layer-0 feature's activation in the frozen model (other writes held) moves every later feature's
    input and every target logit by exactly its edge times the relative change."""
    transcoders = random_set(lm)
    g = full_graph(lm, transcoders).graph
    adapter = adapter_for(lm)
    rec = record(adapter, _ids(lm))
    source = 0
    layer, pos, latent = g.features[source].tolist()
    assert layer == 0
    writes = [o.clone() for o in rec.mlp_out]
    delta = 0.7
    base_hs, base_final = frozen_forward(adapter, rec, rec.embed, writes)
    writes[layer][pos] += delta * transcoders[layer].W_dec[latent]
    hs, final = frozen_forward(adapter, rec, rec.embed, writes)
    scale = delta / float(g.activations[source])
    moved = 0
    for row, (t_layer, t_pos, t_latent) in enumerate(g.features.tolist()):
        w = transcoders[t_layer].W_enc[:, t_latent]
        change = (hs[t_layer][t_pos] - base_hs[t_layer][t_pos]) @ w
        torch.testing.assert_close(change, g.adjacency[row, source] * scale, atol=1e-5, rtol=1e-4)
        moved += bool(change.abs() > 1e-4)
    assert moved > 0
    for j in range(len(g.targets.tokens)):
        change = (final[-1] - base_final[-1]) @ g.targets.vectors[j]
        torch.testing.assert_close(change, g.adjacency[g.logit_start + j, source] * scale, atol=1e-5, rtol=1e-4)


def test_perfect_transcoders_reproduce_the_real_logits(lm):
    """Replace each transcoder's output by the true MLP (its error node made up the rest): the replacement model's
    logits are the real model's, and with zero error the error columns carry nothing."""
    ids = _ids(lm)
    adapter = adapter_for(lm)
    rec = record(adapter, ids)
    transcoders = random_set(lm)
    writes = []
    for layer, tc in transcoders.items():
        recon, _ = tc(rec.mlp_in[layer])
        error = rec.mlp_out[layer] - recon
        writes.append(recon + error)
    _, final = frozen_forward(adapter, rec, rec.embed, writes)
    torch.testing.assert_close(final @ lm.unembed_matrix().float().T, lm.logits(ids[None])[0].float(),
                               atol=1e-5, rtol=1e-5)


def test_missing_layer_is_all_error(lm):
    transcoders = random_set(lm, layers=[1])
    g = full_graph(lm, transcoders).graph
    assert g.missing_layers == [0]
    assert set(g.features[:, 0].tolist()) == {1}
    # layer 0's MLP reaches the logits only through its error nodes, whose direct effects sum with the rest
    ids = _ids(lm)
    logits = lm.logits(ids[None])[0, -1].float()
    _, final0 = _constant_part(lm, transcoders, ids)
    got = g.adjacency[g.logit_start].sum() + final0[-1] @ g.targets.vectors[0]
    torch.testing.assert_close(got, logits[g.targets.tokens[0]] - logits.mean(), atol=2e-4, rtol=1e-4)
    assert g.adjacency[g.logit_start, g.error_start:g.error_start + g.n_pos].abs().sum() > 0


def test_feature_cap_keeps_the_most_influential(lm):
    transcoders = random_set(lm)
    from engine.graph.build import GraphConfig, build_graph

    full = full_graph(lm, transcoders).graph
    capped = build_graph(lm, transcoders, PROMPT, GraphConfig(max_feature_nodes=5, batch_size=2)).graph
    assert capped.n_features == 5 and capped.n_active == full.n_active
    # rows of the selected features are the full graph's rows restricted to the kept columns
    index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    rows = [index[tuple(f)] for f in capped.features.tolist()]
    columns = rows + list(range(full.error_start, full.adjacency.shape[1]))
    torch.testing.assert_close(capped.adjacency[:5], full.adjacency[rows][:, columns], atol=1e-5, rtol=1e-5)


def test_target_logit_weights_read_what_the_vectors_read(lm):
    """A target's vector on the final norm's output equals its combination of the real logits."""
    from engine.graph.build import GraphConfig, build_graph

    ids = _ids(lm)
    logits = lm.logits(ids[None])[0, -1].float()
    final = record(adapter_for(lm), ids).final[-1]
    for cfg in (GraphConfig(max_feature_nodes=5), GraphConfig(target_diff="The, the", max_feature_nodes=5)):
        targets = build_graph(lm, random_set(lm), PROMPT, cfg).graph.targets
        for j in range(len(targets.tokens)):
            weights = targets.logit_weights(j, logits.shape[0])
            torch.testing.assert_close(final @ targets.vectors[j], logits @ weights, atol=1e-4, rtol=1e-4)


def test_clamp_checks_report_the_edge_and_the_real_effect(lm):
    from engine.graph.check import clamp_checks

    transcoders = random_set(lm)
    built = full_graph(lm, transcoders)
    checks = clamp_checks(lm, transcoders, built, top=3)
    g = built.graph
    assert len(checks) == 3
    index = {f"{layer}_{latent}_{pos}": i for i, (layer, pos, latent) in enumerate(g.features.tolist())}
    for c in checks:
        assert c.predicted == pytest.approx(-float(g.adjacency[g.logit_start, index[c.node_id]]))
        assert np.isfinite(c.real)
    # a last-layer feature at the last position reaches the logits only through the final norm (not frozen in the
    # real model): its real effect is the change of the normalised stream, computed here by hand
    last_layer, last_pos = lm.n_layers - 1, g.n_pos - 1
    rows = [i for i, (layer, pos, _) in enumerate(g.features.tolist()) if (layer, pos) == (last_layer, last_pos)]
    i = rows[0]
    latent = int(g.features[i, 2])
    node = f"{last_layer}_{latent}_{last_pos}"
    real = {c.node_id: c.real for c in clamp_checks(lm, transcoders, built, top=g.n_features)}[node]
    ids = _ids(lm)[None]
    x = lm.capture(ids, f"blocks.{last_layer}.hook_resid_post")[f"blocks.{last_layer}.hook_resid_post"][0, -1].float()
    write = float(g.activations[i]) * transcoders[last_layer].W_dec[latent]
    weights = g.targets.logit_weights(0, lm.unembed_matrix().shape[0])
    W_U, norm = lm.unembed_matrix().float(), lm.final_norm()
    by_hand = (W_U @ norm(x - write) - W_U @ norm(x)) @ weights
    assert real == pytest.approx(float(by_hand), rel=1e-4, abs=1e-5)


def test_intervened_logits_match_a_hooked_forward(lm):
    """Adding a vector to an MLP's output in the written-out forward gives the Hugging Face forward's logits with the
    same vector added through saescope's hook; freezing attention with no change gives the clean logits."""
    from engine.graph.frozen import intervened_logits

    ids = _ids(lm)
    adapter = adapter_for(lm)
    rec = record(adapter, ids)
    delta = torch.zeros(len(ids), lm.d_model)
    delta[2] = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3))
    clean = lm.logits(ids[None])[0].float()
    torch.testing.assert_close(intervened_logits(adapter, rec, {}, freeze_attention=True), clean, atol=1e-5, rtol=1e-5)
    with lm.hooks.intervene("blocks.0.hook_mlp_out", lambda out: out + delta.to(out.dtype)):
        hooked = lm.logits(ids[None])[0].float()
    free = intervened_logits(adapter, rec, {0: delta}, freeze_attention=False)
    torch.testing.assert_close(free, hooked, atol=1e-5, rtol=1e-5)
    frozen = intervened_logits(adapter, rec, {0: delta}, freeze_attention=True)
    torch.testing.assert_close(frozen[:2], clean[:2], atol=1e-5, rtol=1e-5)  # earlier positions never see the change
    assert not torch.allclose(frozen[3:], free[3:], atol=1e-4)  # later layers' patterns would have moved


def test_rotary_positions_equal_transformers_own():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine.graph.frozen import rotate

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, 5, 8, generator=gen), torch.randn(1, 3, 5, 8, generator=gen)
    cos, sin = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rotate(q, cos, sin), want_q) and torch.equal(rotate(k, cos, sin), want_k)
