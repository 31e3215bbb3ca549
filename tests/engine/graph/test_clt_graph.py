"""Attribution graphs over a cross-layer transcoder (a feature of layer l writes to the MLP outputs of l and every
later layer): contributions sum to each input and each target logit, an intervention in the frozen model moves the
targets by exactly the edge through every layer it writes to, a CLT that writes only to its own layer gives the
per-layer transcoders' graph, and the command reads circuit-tracer's files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.graph.build import GraphConfig, build_graph
from engine.graph.files import make_graph
from engine.graph.frozen import adapter_for, frozen_forward, record
from engine.model.tiny import tiny_model
from engine.saes.clt import CrossLayerTranscoder, load_clt
from engine.saes.transcoders import Transcoder

from .graph_util import PROMPT


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param)


def random_clt(lm, d_sae: int = 48, seed: int = 0, cross: bool = True) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    n, d = lm.n_layers, lm.d_model
    W_dec = [torch.randn(d_sae, n - i, d, generator=g) / d_sae ** 0.5 for i in range(n)]
    if not cross:
        for w in W_dec:
            w[:, 1:] = 0
    return CrossLayerTranscoder(torch.randn(n, d, d_sae, generator=g) / d ** 0.5, torch.randn(n, d_sae, generator=g) * 0.1,
                                W_dec, torch.randn(n, d, generator=g) * 0.1, "ln2.hook_normalized", "hook_mlp_out",
                                threshold=torch.rand(n, d_sae, generator=g) * 0.2)


def _ids(lm):
    return torch.tensor(lm.tokenizer(PROMPT)["input_ids"])


def _graph(lm, clt):
    return build_graph(lm, clt, PROMPT, GraphConfig(max_feature_nodes=10 ** 6)).graph


def test_contributions_sum_to_each_input(lm):
    clt = random_clt(lm)
    g = _graph(lm, clt)
    assert g.n_features == g.n_active > 0 and set(g.features[:, 0].tolist()) == set(range(lm.n_layers))
    ids = _ids(lm)
    hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(lm.n_layers)]
    h = lm.capture(ids[None], hooks)
    adapter = adapter_for(lm)
    rec = record(adapter, ids)
    pos, d = rec.embed.shape
    # every node silenced: only the biases (b_dec of each layer's output, norm and attention biases) remain
    hs0, final0 = frozen_forward(adapter, rec, torch.zeros(pos, d), [clt.b_dec[L].expand(pos, d) for L in range(lm.n_layers)])
    for row, (layer, p, latent) in enumerate(g.features.tolist()):
        w = clt.W_enc[layer][:, latent]
        want = h[hooks[layer]][0, p].float() @ w
        torch.testing.assert_close(g.adjacency[row].sum() + hs0[layer][p] @ w, want, atol=2e-4, rtol=1e-4)
    logits = lm.logits(ids[None])[0, -1].float()
    for j, token in enumerate(g.targets.tokens):
        got = g.adjacency[g.logit_start + j].sum() + final0[-1] @ g.targets.vectors[j]
        torch.testing.assert_close(got, logits[token] - logits.mean(), atol=2e-4, rtol=1e-4)


def test_an_intervention_moves_the_targets_by_the_edge_through_every_layer_it_writes(lm):
    clt = random_clt(lm)
    g = _graph(lm, clt)
    adapter = adapter_for(lm)
    rec = record(adapter, _ids(lm))
    source = 0
    layer, pos, latent = g.features[source].tolist()
    assert layer == 0
    writes = [o.clone() for o in rec.mlp_out]
    _, base_final = frozen_forward(adapter, rec, rec.embed, writes)
    delta = 0.7
    for j in range(lm.n_layers - layer):  # the feature's write to its own layer and to each later one
        writes[layer + j][pos] += delta * clt.W_dec[layer][latent, j]
    _, final = frozen_forward(adapter, rec, rec.embed, writes)
    scale = delta / float(g.activations[source])
    for j in range(len(g.targets.tokens)):
        change = (final[-1] - base_final[-1]) @ g.targets.vectors[j]
        torch.testing.assert_close(change, g.adjacency[g.logit_start + j, source] * scale, atol=1e-5, rtol=1e-4)


def test_a_clt_that_writes_only_its_own_layer_is_the_per_layer_graph(lm):
    clt = random_clt(lm, cross=False)
    per_layer = {L: Transcoder(clt.W_enc[L], clt.b_enc[L], clt.W_dec[L][:, 0], clt.b_dec[L], f"blocks.{L}.ln2.hook_normalized",
                               f"blocks.{L}.hook_mlp_out", threshold=clt.threshold[L] if clt.threshold is not None else None)
                 for L in range(lm.n_layers)}
    a, b = _graph(lm, clt), build_graph(lm, per_layer, PROMPT, GraphConfig(max_feature_nodes=10 ** 6)).graph
    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.adjacency, b.adjacency, atol=1e-5, rtol=1e-5)


def test_the_graph_command_reads_circuit_tracers_files(tmp_path):
    lm = tiny_model("llama")
    clt = random_clt(lm)
    folder = tmp_path / "clt"
    folder.mkdir()
    assert clt.threshold is not None
    for i in range(lm.n_layers):  # circuit-tracer's layout (engine/saes/clt.py)
        save_file({f"W_enc_{i}": clt.W_enc[i].T.contiguous(), f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i],
                   f"threshold_{i}": clt.threshold[i]}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": clt.W_dec[i].contiguous()}, str(folder / f"W_dec_{i}.safetensors"))
    with pytest.raises(ValueError, match="needs features that read ln2.hook_normalized"):
        make_graph(lm, folder, PROMPT, GraphConfig(), tmp_path / "g.json")
    (folder / "config.yaml").write_text("feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
    built, paths = make_graph(lm, folder, PROMPT, GraphConfig(max_feature_nodes=10 ** 6), tmp_path / "g.json")
    torch.testing.assert_close(built.graph.adjacency, _graph(lm, load_clt(folder)).adjacency)
    assert paths["json"].is_file()


def test_clamp_checks_ablate_a_clt_feature_at_every_layer_it_writes():
    """The real-model check removes the feature's write from its own and every later MLP output (plain torch hooks
    here)."""
    from engine.graph.check import clamp_checks

    lm = tiny_model("llama")
    clt = random_clt(lm)
    built = build_graph(lm, clt, PROMPT, GraphConfig(max_feature_nodes=10 ** 6))
    (check,) = clamp_checks(lm, clt, built, top=1)
    g = built.graph
    i = int(built.pruned.influence[:g.n_features].argmax())
    layer, pos, latent = g.features[i].tolist()
    assert check.node_id == f"{layer}_{latent}_{pos}"
    ids = torch.tensor(g.ids)[None]
    handles = []
    for j in range(lm.n_layers - layer):
        write = float(g.activations[i]) * clt.W_dec[layer][latent, j]

        def hook(m, a, out, write=write):
            out = out.clone()
            out[:, pos] -= write
            return out

        handles.append(lm.model.model.layers[layer + j].mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            ablated = lm.model(ids).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    clean = lm.logits(ids)[0, -1].float()
    w = g.targets.logit_weights(0, clean.shape[0])
    assert check.real == pytest.approx(float((ablated - clean) @ w), abs=1e-5)
    assert check.predicted == pytest.approx(-float(g.adjacency[g.logit_start, i]), abs=1e-6)
