import torch

from engine.circuits.patching import patch_scan, run_with_cache
from engine.circuits.path_patching import direct_path_logits, path_patch_scan
from engine.model.tiny import tiny_model
from tests.engine.circuits.test_patching import make_task


def test_a_last_layer_head_path_patched_equals_activation_patched_without_the_last_mlp():
    lm = tiny_model("llama", n_layers=2)
    with torch.no_grad():  # the last MLP writes nothing: a last-layer head then reaches the logits only directly
        lm.hf_model.model.layers[-1].mlp.down_proj.weight.zero_()
    task = make_task(n=4)
    path = path_patch_scan(lm, task)
    activation = patch_scan(lm, task, mean_ablation=False).patch
    torch.testing.assert_close(torch.tensor(path[-1]), torch.tensor(activation[-1]), atol=1e-4, rtol=1e-4)
    assert abs(activation[-1]).max() > 1e-3  # the heads do something: the equality is not 0 = 0
    # an earlier head also reaches the logits through the later layer: its direct path is only part of its effect
    assert not torch.allclose(torch.tensor(path[0]), torch.tensor(activation[0]), atol=1e-4)


def test_all_direct_paths_at_once_by_hand():
    lm = tiny_model("llama", n_layers=3)
    p = make_task(n=2).pairs[0]
    ids, cf = torch.tensor([p.prompt_ids]), torch.tensor([p.counterfactual_ids])
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(3)]
    _, clean = run_with_cache(lm, ids, [*names, "blocks.2.hook_resid_post"])
    _, other = run_with_cache(lm, cf, names)
    heads = [(0, 1), (1, 0), (1, 3), (2, 2)]
    resid = clean["blocks.2.hook_resid_post"][0, -1].clone()
    for layer, head in heads:  # each head's slice of o_proj, read from the module's weight [d_model, heads * d_head]
        W = lm.hf_model.model.layers[layer].self_attn.o_proj.weight
        d_head = W.shape[1] // lm.n_heads
        change = (other[names[layer]] - clean[names[layer]])[0, -1, head]
        resid += W[:, head * d_head:(head + 1) * d_head] @ change
    expected = lm.hf_model.lm_head(lm.hf_model.model.norm(resid))
    got = direct_path_logits(lm, ids, cf, heads)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - direct_path_logits(lm, ids, cf, [])[0]).abs().max() > 1e-4  # the patch changes the logits
