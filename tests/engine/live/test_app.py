"""APP steering on a tiny model: the intervention against the hand formula (scipy KDE posteriors), zero-ablation,
the fitting/held-out split, and the removal report's losses against a hand cross-entropy."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from engine.analysis.concepts import ConceptDensities, read_concepts
from engine.live.app import (
    app_intervention,
    fit_concept,
    mean_loss,
    removal_report,
    split_texts,
    zero_intervention,
)
from tests.engine.saes_util import random_sae

HOOK = "blocks.0.hook_resid_post"
TEXTS = {"code": ["def f(x): return x + 1", "import os, sys", "for i in range(3): print(i)", "x = [1, 2, 3]",
                  "class A: pass", "while True: break"],
         "prose": ["The river runs past the mill", "She walked home in the rain", "Birds sing at dawn",
                   "The old man smiled", "It was a quiet night", "They sailed across the bay"]}


def _ids(lm, text="The quick brown fox jumps over"):
    return torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


def _densities(base_codes: torch.Tensor) -> ConceptDensities:
    """Concept 0 of two: latent ``zeroed`` exclusive; two firing latents shared, with planted values around their
    observed codes (concept 0 near them, concept 1 a little above)."""
    fired = (base_codes > 0).sum(0).argsort(descending=True)
    zeroed, shared = int(fired[0]), [int(fired[1]), int(fired[2])]
    rng = np.random.default_rng(0)
    points = torch.full((2, 2, 12), float("nan"), dtype=torch.float64)
    bandwidth = torch.zeros(2, 2, dtype=torch.float64)
    own = []
    for j, latent in enumerate(shared):
        centre = float(base_codes[:, latent].max())
        for c, shift in enumerate((0.0, 0.3 * centre)):
            v = centre + shift + rng.normal(0, 0.2 * centre, 12)
            points[j, c] = torch.from_numpy(v)
            bandwidth[j, c] = v.std(ddof=1) * 12 ** (-1 / 5)
        own.append(points[j, 0].numpy())
    return ConceptDensities(0, [zeroed], shared, points, bandwidth,
                            torch.tensor([o.mean() for o in own]), torch.tensor([o.std(ddof=1) for o in own]))


def test_app_scales_latents_by_the_posterior(tiny_llama):
    lm = tiny_llama
    sae = random_sae("topk", d_in=lm.d_model, hook=HOOK)
    ids = _ids(lm)
    base = lm.capture(ids, HOOK)[HOOK][0]
    codes = sae.encode(base).detach()
    dens = _densities(codes)
    with app_intervention(lm, sae, dens)():
        steered = lm.capture(ids, HOOK)[HOOK][0]
    expected = base.double() - codes[:, dens.exclusive].double() @ sae.W_dec[dens.exclusive].double()
    for j, latent in enumerate(dens.shared):
        a = codes[:, latent].double().numpy()
        p = [gaussian_kde(dens.points[j, c].numpy())(a) for c in range(2)]
        posterior = p[0] / (p[0] + p[1] + 1e-12)
        own = dens.points[j, 0].numpy()
        tail = (a < own.mean() - 2.5 * own.std(ddof=1)) | (a > own.mean() + 2.5 * own.std(ddof=1))
        factor = np.where(tail, 1.0, 1 - posterior)
        assert ((a > 0) & ~tail & (posterior > 0.01)).any()  # the case is not trivial
        expected += torch.from_numpy((factor - 1) * a)[:, None] * sae.W_dec[latent].double()
    torch.testing.assert_close(steered.double(), expected, atol=1e-4, rtol=1e-4)
    with zero_intervention(lm, sae, dens)():
        zeroed = lm.capture(ids, HOOK)[HOOK][0]
    every = [*dens.exclusive, *dens.shared]
    torch.testing.assert_close(zeroed.double(), base.double() - codes[:, every].double() @ sae.W_dec[every].double(),
                               atol=1e-4, rtol=1e-4)


def _concepts(tmp_path):
    path = tmp_path / "concepts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": label}) for label, texts in TEXTS.items() for t in texts))
    return read_concepts(path)


def test_split_alternates_within_each_concept(tmp_path):
    concepts = _concepts(tmp_path)
    fit, held = split_texts(concepts)
    assert list(fit) == [0, 2, 4, 6, 8, 10] and list(held) == [1, 3, 5, 7, 9, 11]


def test_removal_report_losses(tiny_llama, tmp_path):
    lm = tiny_llama
    sae = random_sae("topk", d_in=lm.d_model, hook=HOOK)
    concepts = _concepts(tmp_path)
    dens = fit_concept(lm, sae, concepts, "code", share=0.0)
    assert dens.exclusive or dens.shared
    rows = {r.method: r for r in removal_report(lm, sae, concepts, dens, texts_per_side=3)}
    assert list(rows) == ["clean", "APP", "zero-ablation"]
    # the clean loss by hand: log-softmax of the model's logits at each next token of the held-out code texts
    total, count = 0.0, 0
    for text in TEXTS["code"][1::2]:
        ids = _ids(lm, text)
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
        total -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert rows["clean"].concept_loss == pytest.approx(total / count, rel=1e-5)
    assert rows["clean"].concept_ppl == pytest.approx(np.exp(total / count), rel=1e-5)
    assert rows["zero-ablation"].concept_loss != rows["clean"].concept_loss
    loss, n = mean_loss(lm, TEXTS["prose"][1::2], zero_intervention(lm, sae, dens))
    assert rows["zero-ablation"].other_loss == pytest.approx(loss) and n == count_tokens(lm, TEXTS["prose"][1::2])
    with pytest.raises(ValueError, match="no concept 'poetry'"):
        fit_concept(lm, sae, concepts, "poetry")


def count_tokens(lm, texts):
    return sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) - 1 for t in texts)
