"""First-letter absorption: the scores on hand-built cases (every branch of SAEBench's definition), the
feature-split rule, the vocabulary and the prompts built from token ids, and the whole metric on a tiny model."""

import numpy as np
import pytest
import torch

from engine.eval.absorption import (
    LETTERS,
    TEMPLATE,
    AbsorptionConfig,
    absorption,
    absorption_scores,
    alpha_vocab,
    build_prompts,
    first_letter,
    l1_steps,
    main_latents,
    summary_rows,
)
from engine.model.tiny import tiny_tokenizer
from tests.engine.saes_util import random_sae

U = torch.tensor([1.0, 0.0, 0.0])  # the probe's unit direction
COS = torch.tensor([0.9, 0.5, 0.05, 0.3, -0.2])  # each latent's decoder cosine with it


def score(x, codes, main):
    frac, full = absorption_scores(torch.tensor([x]), torch.tensor([codes]), U, COS, main)
    return float(frac[0]), bool(full[0])


def test_absorption_branches_by_hand():
    # the main latent (0) carries the whole probe projection: no absorption
    assert score([2.0, 0, 0], [3.0, 0, 0, 0, 0], [0]) == (0.0, False)
    # main silent; latent 1 (cos .5) projects 2.0 * .5 = 1.0 of p = 2: share .5 >= .4 -> fully absorbed
    assert score([2.0, 0, 0], [0, 2.0, 0, 0, 0], [0]) == (1.0, True)
    # main silent, the only other firing latent has cos .05 < .1: not an absorber (share 0) -> 0; but it is the
    # top-projecting latent with cos >= .025 and .05 * 20 = 1.0 >= .4 * 2: full absorption still counts it
    assert score([2.0, 0, 0], [0, 0, 20.0, 0, 0], [0]) == (0.0, True)
    # main projects .9 * 1 = .9 of p = 2; absorbers 1 and 3 project 1.0 + .3 = 1.3 >= .4 * 2
    frac, full = score([2.0, 0, 0], [1.0, 2.0, 0, 1.0, 0], [0])
    absorbed = min(1.3, 2.0 - 0.9)
    assert frac == pytest.approx(absorbed / (absorbed + 0.9)) and not full  # a main latent fired
    # absorbers explain too little (.3 / 2 < .4): 0
    assert score([2.0, 0, 0], [1.0, 0, 0, 1.0, 0], [0]) == (0.0, False)
    # negative cosines never absorb; a main latent that fires with negative projection counts as <= 0 -> 1
    assert score([2.0, 0, 0], [0, 0, 0, 3.0, 1.0], [4])[0] == 1.0
    # at most three absorbers are summed (their top projections)
    cos = torch.tensor([0.9, 0.2, 0.2, 0.2, 0.2])
    frac, _ = absorption_scores(torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0]]), U, cos, [0])
    assert frac[0] == pytest.approx(min(0.6, 1 - 0.45) / (min(0.6, 1 - 0.45) + 0.45))


def test_feature_split_rule():
    feats = [[5], [5, 9], [5, 9, 2], [5, 9, 2, 7]]
    assert main_latents([0.5, 0.6, 0.62, 0.9], feats, 0.03) == [5, 9]  # .62 is no jump: the search stops there
    assert main_latents([0.5, 0.51, 0.9, 0.95], feats, 0.03) == [5]
    assert main_latents([0.0, 0.0], feats[:2], 0.03) == [5]  # k = 1 always counts


def test_vocabulary_and_prompts():
    tok = tiny_tokenizer()
    vocab = alpha_vocab(tok, {0})
    assert vocab and all(t.strip().isalpha() and t.strip().isascii() for _, t in vocab)
    assert all(tok.decode([i]) == t for i, t in vocab[:20])
    assert first_letter(" Quick") == LETTERS.index("q")
    prompts = build_prompts(tok, vocab[:5], vocab, 3, np.random.default_rng(0))
    template = tok(TEMPLATE, add_special_tokens=False)["input_ids"]
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    for (tid, _), ids, pos in zip(vocab[:5], prompts.ids, prompts.position, strict=True):
        assert ids[pos] == tid and ids[pos + 1 :] == template and ids[: len(sep)] == sep
        starts = [i for i in range(pos) if ids[i + 1 : i + 1 + len(template)] == template]  # the examples' words
        assert len(starts) == 3 and tid not in [ids[i] for i in starts]  # never one of its own examples
        assert ids[pos - len(sep) : pos] == sep


def test_absorption_runs_on_a_tiny_model(tiny_llama):
    sae = random_sae("topk", d_in=64, d_sae=128)
    cfg = AbsorptionConfig(words=0, icl_examples=3, min_letters=1, min_probe_f1=0.0, l1_epochs=3, max_k=3)
    rows = absorption(tiny_llama, sae, cfg)
    metrics = {r.metric for r in rows}
    assert {"probe_f1", "sparse_probe_f1", "num_split_features", "letters_evaluated"} <= metrics
    for r in rows:
        if r.metric in ("mean_absorption_fraction", "full_absorption_rate", "probe_f1", "sparse_probe_f1"):
            assert 0.0 <= r.value <= 1.0
        if r.metric == "sparse_probe_f1":
            assert len(r.latents) == r.k and all(0 <= i < 128 for i in r.latents)
    evaluated = next(r for r in rows if r.metric == "letters_evaluated").value
    assert evaluated == sum(r.metric == "mean_absorption_fraction" and r.task is not None for r in rows)
    strict = absorption(tiny_llama, sae, AbsorptionConfig(words=0, icl_examples=3, l1_epochs=1, max_k=2))
    assert not any(r.task is None and r.metric == "mean_absorption_fraction" for r in strict)  # < 20 letters pass


def test_ground_truth_probe_l2_is_saebench_effective_one():
    """SAEBench's 26-way probe (Adam, weight decay 1e-4, BCE with positive weights averaged over samples and the 26
    letters) converges, letter by letter, to the logistic regression with L2 ``26 * 1e-4`` per sample, which
    ``probe_l2`` is; the old per-sample 1e-4 gives another probe."""
    from engine.eval.probe import fit_logistic

    gen = np.random.default_rng(0)
    n, d = 520, 4
    labels = np.arange(n) % len(LETTERS)
    centres = gen.normal(size=(len(LETTERS), d)) * 0.4
    x = (centres[labels] + gen.normal(size=(n, d))).astype(np.float64)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels), len(LETTERS)).double()
    n_pos = y.sum(0)
    weight = torch.zeros(len(LETTERS), d, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(LETTERS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([{"params": [weight], "weight_decay": 1e-4}, {"params": [bias], "weight_decay": 0.0}], lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-4 / 0.05) ** (1 / 300))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - n_pos) / n_pos)
    xt = torch.from_numpy(x)
    for _ in range(300):  # full batches: the optimum, not SGD noise
        opt.zero_grad()
        loss_fn(xt @ weight.T + bias, y).backward()
        opt.step()
        sched.step()
    cfg = AbsorptionConfig()
    assert cfg.probe_l2 == pytest.approx(26e-4)
    for li in (0, 7):
        pos = labels == li
        sw = np.where(pos, (n - pos.sum()) / pos.sum(), 1.0)
        ours = fit_logistic(x, pos, C=1 / (cfg.probe_l2 * n), sample_weight=sw)
        old = fit_logistic(x, pos, C=1 / (1e-4 * n), sample_weight=sw)
        adam = weight[li].detach().numpy()
        assert np.linalg.norm(ours.coef - adam) < 2e-4 * np.linalg.norm(adam)
        assert np.linalg.norm(old.coef - adam) > 3e-3 * np.linalg.norm(adam)


def test_l1_probe_steps_follow_the_whole_vocabulary():
    cfg = AbsorptionConfig()
    assert l1_steps(20_000, cfg) == (50 * 5, 5)  # ceil(20000 / 4096) batches per epoch, 50 epochs
    assert l1_steps(3_200, cfg) == (50, 1)
    assert l1_steps(40_000, AbsorptionConfig(l1_epochs=3, l1_batch=1000)) == (120, 40)


def test_spread_over_letters_is_the_sample_standard_deviation():
    import statistics

    per_letter = [(0.1, 0.0, 1), (0.3, 0.5, 2), (0.2, 0.25, 1), (0.7, 0.0, 3)]
    rows = {r.metric: r.value for r in summary_rows(per_letter)}
    for i, (mean, std) in enumerate((("mean_absorption_fraction", "std_dev_absorption_fraction"),
                                     ("mean_full_absorption", "std_dev_full_absorption"),
                                     ("mean_num_split_features", "std_dev_num_split_features"))):
        column = [p[i] for p in per_letter]
        assert rows[mean] == pytest.approx(statistics.mean(column))
        assert rows[std] == pytest.approx(statistics.stdev(column))
