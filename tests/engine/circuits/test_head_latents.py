import numpy as np
import pytest
import torch

from engine.circuits.head_latents import head_latents, head_terms, top_latents
from engine.model.tiny import tiny_model
from tests.engine.saes_util import random_sae

HOOK = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", n_layers=2)


def test_head_terms_by_brute_force(lm):
    sae = random_sae("standard", d_in=lm.d_model, d_sae=32, hook=HOOK, apply_b_dec_to_input=False)
    prompts = [[5, 9, 14, 3, 7], [6, 2, 11, 40, 8], [1, 2, 3]]  # two lengths: two batches
    for head in range(lm.n_heads):
        expected = np.zeros(32)
        for ids in prompts:
            z = lm.capture(torch.tensor([ids]), HOOK)[HOOK][0, -1].float()  # [n_heads, d_head]
            others = z.clone()
            others[head] = 0
            W, b = sae.W_enc.float(), sae.b_enc.float()
            pre, pre_without = z.flatten() @ W + b, others.flatten() @ W + b
            expected += ((pre - pre_without) * (pre > 0)).numpy()
        np.testing.assert_allclose(head_terms(lm, sae, prompts, head), expected / len(prompts), atol=1e-5)
    terms = head_latents(lm, sae, prompts[:2], prompts[2:], 1)
    best_positive, best_negative = top_latents(terms, 3)
    assert best_positive == [int(j) for j in np.argsort(-terms.positive, kind="stable")[:3] if terms.positive[j] > 0]
    assert all(terms.negative[j] > 0 for j in best_negative)


def test_an_sae_not_on_hook_z_is_refused(lm):
    sae = random_sae("standard", d_in=lm.d_model, d_sae=32, hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="needs an attn.hook_z SAE"):
        head_terms(lm, sae, [[1, 2, 3]], 0)
