import pytest
import torch

from engine.circuits.heads import all_head_results, output_projection
from engine.model.families import decoder_layers
from engine.model.tiny import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gpt_neox", "gemma", "gemma2"])
def test_heads_sum_to_the_attention_output(family):
    lm = tiny_model(family, n_heads=4)  # llama/qwen2/gemma: 2 KV heads for 4 query heads (GQA)
    ids = torch.randint(1, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    outputs = {}
    hooks = []
    for layer, block in enumerate(decoder_layers(lm.model, lm.family)):
        def grab(module, args, out, layer=layer):
            outputs[layer] = (out[0] if isinstance(out, tuple) else out).float()
        hooks.append(getattr(block, lm.family.attn).register_forward_hook(grab))
    try:
        results = all_head_results(lm, ids)
        lm.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    assert results.shape == (2, 7, lm.n_layers, lm.n_heads, lm.d_model)
    for layer in range(lm.n_layers):
        bias = output_projection(lm, layer).bias
        torch.testing.assert_close(results[:, :, layer].sum(2) + bias, outputs[layer], rtol=1e-4, atol=1e-5)
        assert results[:, :, layer].abs().amax(dim=(0, 1, 3)).min() > 0  # every head contributes


def test_a_projection_that_is_not_affine_is_refused():
    lm = tiny_model("llama")
    block = decoder_layers(lm.model, lm.family)[0]
    attn = getattr(block, lm.family.attn)
    attn.o_proj = torch.nn.Sequential(attn.o_proj, torch.nn.ReLU())
    with pytest.raises(ValueError, match="not affine: no per-head decomposition"):
        output_projection(lm, 0)


def test_head_features_pool_each_prompt_over_its_own_positions():
    from engine.circuits.pipeline import head_features
    from engine.circuits.tasks import Task, TaskPair

    lm = tiny_model("llama")
    pairs = tuple(TaskPair("p", "c", "a", "w", tuple(range(5 + n, 10 + 2 * n)), tuple(range(20, 25 + n)), (1,), (2,))
                  for n in range(3))  # three lengths: three batches
    task = Task("t", pairs)
    projections = [output_projection(lm, layer) for layer in range(lm.n_layers)]
    for position in ("mean", "last"):
        x = head_features(lm, task, position, projections)
        assert x.shape == (6, lm.n_layers * lm.n_heads, lm.d_model)
        for row, ids in enumerate([p.prompt_ids for p in pairs] + [p.counterfactual_ids for p in pairs]):
            alone = all_head_results(lm, torch.tensor([ids]))[0]  # [pos, layers, heads, d]
            pooled = alone.mean(0) if position == "mean" else alone[-1]
            torch.testing.assert_close(x[row], pooled.flatten(0, 1), rtol=1e-4, atol=1e-5)
