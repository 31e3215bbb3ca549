"""The g-SAE lens against a hand computation of z, the gradient term and the admissions."""

import numpy as np
import pytest
import torch

from engine.data.gradients import hook_gradients
from engine.live.gradient_lens import gradient_lens
from tests.engine.saes_util import random_sae

HOOK = "blocks.0.hook_resid_post"


def test_gradient_lens_admissions_match_a_hand_computation(tiny_llama):
    sae = random_sae("gradient_topk", k=6, gradient_beta=20.0, hook=HOOK, d_in=tiny_llama.d_model)
    ids = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    rows = gradient_lens(tiny_llama, sae, ids[0].tolist(), top_k=6)
    acts, grads = hook_gradients(tiny_llama, HOOK, ids)
    p = {n: t.detach().double().numpy() for n, t in sae.named_parameters()}
    n_admitted = 0
    for t, row in enumerate(rows):
        x, g = acts[0, t].double().numpy(), grads[0, t].double().numpy()
        z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        term = 20.0 * z * np.abs(p["W_dec"] @ g)
        with_grad, plain = set(np.argsort(-(z + term))[:6]), set(np.argsort(-z)[:6])
        with_grad = {i for i in with_grad if z[i] > 0}
        plain = {i for i in plain if z[i] > 0}
        if t == 0:  # position 0 is excluded
            assert row.admitted == [] and not row.has_gradient
            continue
        assert {a for a, _, _ in row.admitted} == with_grad - plain
        assert set(row.displaced) == plain - with_grad
        for latent, z_got, term_got in row.admitted:
            assert z_got == pytest.approx(z[latent], rel=1e-4, abs=1e-5)
            assert term_got == pytest.approx(term[latent], rel=1e-3, abs=1e-4)
        n_admitted += len(row.admitted)
    assert n_admitted > 0 and rows[-1].admitted == [] and not rows[-1].has_gradient
    with pytest.raises(ValueError, match="for g-SAEs"):
        gradient_lens(tiny_llama, random_sae("topk", hook=HOOK, d_in=tiny_llama.d_model), ids[0].tolist())
