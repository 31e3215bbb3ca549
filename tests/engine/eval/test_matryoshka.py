"""Matryoshka prefix curves against numpy on the same tokens."""

import numpy as np
import pytest
import torch

from engine.analysis.metrics import ce_metrics
from engine.data.activations import iter_activations
from engine.eval.matryoshka import prefix_curve, prefix_sae
from tests.engine.saes_util import random_sae

HOOK = "blocks.0.hook_resid_post"


def test_prefix_curve_matches_numpy(tiny_llama):
    sae = random_sae("jumprelu", d_in=tiny_llama.d_model, hook=HOOK, matryoshka_widths=[16, 64, 256])
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(1, 300, (6, 12), generator=gen).tolist()
    points = prefix_curve(tiny_llama, sae, contexts, batch_size=3)
    assert [p.width for p in points] == [16, 64, 256] and [p.groups for p in points] == [1, 2, 3]
    x = torch.cat([b.acts[b.mask].float() for b in iter_activations(tiny_llama, HOOK, contexts, 3)]).double().numpy()
    prm = {n: t.detach().double().numpy() for n, t in sae.named_parameters()}
    pre = (x - prm["b_dec"]) @ prm["W_enc"] + prm["b_enc"]
    codes = np.where(pre > prm["threshold"], np.maximum(pre, 0), 0)
    total = ((x - x.mean(0)) ** 2).sum()
    for p in points:
        x_hat = codes[:, : p.width] @ prm["W_dec"][: p.width] + prm["b_dec"]
        assert p.explained_variance == pytest.approx(1 - ((x - x_hat) ** 2).sum() / total, rel=1e-5, abs=1e-6)
        assert p.l0 == pytest.approx((codes[:, : p.width] > 0).sum(1).mean(), rel=1e-6)
    # the full prefix is the SAE itself
    ids = torch.tensor(contexts)
    mask = torch.cat([b.mask for b in iter_activations(tiny_llama, HOOK, contexts, 3)])
    assert points[-1].ce_loss_recovered == pytest.approx(ce_metrics(tiny_llama, sae, ids, mask, 3).ce_loss_recovered)
    assert torch.equal(prefix_sae(sae, 16).W_dec[16:], torch.zeros(240, sae.cfg.d_in)) and sae.W_dec[16:].abs().sum() > 0
    with pytest.raises(ValueError, match="no Matryoshka groups"):
        prefix_curve(tiny_llama, random_sae("jumprelu", d_in=tiny_llama.d_model, hook=HOOK), contexts)
