"""The prompt lens and steering on a CUDA device agree with the CPU (run by scripts/gpu_check.sh; skipped with the
reason where torch sees no CUDA device)."""

import pytest
import torch

from engine.live.lens import prompt_lens, tokenize_prompt
from engine.live.steering import SteeringSpec, compare, generate, steering_intervention
from engine.model.tiny import tiny_model
from tests.engine.saes_util import random_sae

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def pair():
    cpu = tiny_model("llama")
    gpu = tiny_model("llama")
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    return cpu, gpu


def test_lens_on_cuda_equals_cpu(pair):
    cpu, gpu = pair
    sae = random_sae("topk", hook="blocks.0.hook_resid_post")
    ids = tokenize_prompt(cpu, "The quick brown fox jumps over the lazy dog")
    a = prompt_lens(cpu, sae, ids, top_k=3)
    b = prompt_lens(gpu, sae.to("cuda"), ids, top_k=3)
    for x, y in zip(a.tokens[1:], b.tokens[1:], strict=True):
        assert [i for i, _ in x.top_latents] == [i for i, _ in y.top_latents]
        assert y.err_norm == pytest.approx(x.err_norm, rel=1e-3)
        if x.ce_delta is not None:
            assert y.ce_delta == pytest.approx(x.ce_delta, abs=1e-3)
    torch.testing.assert_close(b.codes.to_dense().cpu(), a.codes.to_dense(), atol=1e-4, rtol=1e-4)


def test_steering_on_cuda_changes_tokens_and_greedy_matches_cpu(pair):
    cpu, gpu = pair
    sae = random_sae("standard", hook="blocks.0.hook_resid_post").to("cuda")
    prompt = cpu.tokenizer("The quick brown", add_special_tokens=False)["input_ids"]
    plain = list(generate(gpu, prompt, max_new_tokens=10, temperature=0.0, stop_at_eos=False))
    assert plain == list(generate(cpu, prompt, max_new_tokens=10, temperature=0.0, stop_at_eos=False))
    factory = steering_intervention(gpu, sae, SteeringSpec({4: 8.0}), max_acts={4: 5.0})
    pairs = list(compare(gpu, prompt, factory, max_new_tokens=10, temperature=0.0, stop_at_eos=False))
    assert [p[0] for p in pairs] == plain and [p[1] for p in pairs] != plain
