"""The demo model (SmolLM2-135M) on the built-in tasks (slow: loads the demo model)."""

import pytest
import torch

from engine.circuits.heads import all_head_results, output_projection
from engine.circuits.patching import performance
from engine.circuits.tasks import load_task
from engine.model.demo import ensure_demo_model
from engine.model.families import decoder_layers
from engine.model.loading import load_model

pytestmark = pytest.mark.slow


def test_the_demo_model_does_the_three_tasks_and_its_heads_sum_to_attention():
    lm = load_model(ensure_demo_model(), device="cpu", dtype="float32")
    for name in ("ioi", "greater-than", "docstring"):
        perf = performance(lm, load_task(name, lm.tokenizer, 8, seed=1))
        assert perf.accuracy >= 0.75 and perf.logit_diff > perf.logit_diff_counterfactual + 1, (name, perf)
    # GQA, 9 query heads on 3 KV heads: the heads' outputs plus o_proj's bias are the attention output
    ids = torch.tensor([load_task("ioi", lm.tokenizer, 2, seed=0).pairs[0].prompt_ids])
    seen = {}
    attn = getattr(decoder_layers(lm.model, lm.family)[7], lm.family.attn)

    def grab(module, args, out) -> None:
        seen.setdefault("out", out[0].float())

    handle = attn.register_forward_hook(grab)
    try:
        results = all_head_results(lm, ids)
        lm.logits(ids)
    finally:
        handle.remove()
    summed = results[:, :, 7].sum(2) + output_projection(lm, 7).bias
    torch.testing.assert_close(summed, seen["out"], rtol=1e-4, atol=1e-4)
