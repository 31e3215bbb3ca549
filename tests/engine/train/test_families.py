"""train-sae for the g-SAE, feature-choice, mutual-choice and Matryoshka families on a tiny model: learning, what is
saved, the auxiliary and prefix losses against hand formulas, the loss gradient, and resuming from a checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

from engine import load_sae
from engine.data.gradients import hook_gradients
from engine.train import TRAINERS, TrainConfig, train_sae
from engine.train.checkpoint import checkpoint_dir

HOOK = "blocks.1.hook_resid_post"
EXTRA = {"gradient_topk": {"gradient_beta": 4.0}, "feature_choice": {}, "mutual_choice": {},
         "matryoshka": {"matryoshka_widths": "32,96,256"}}


def _cfg(tiny_corpus, architecture, **kw):
    base = dict(hook_name=HOOK, corpus=str(tiny_corpus), width=256, k=8, tokens=12_288, context_len=64, batch_size=512,
                buffer_tokens=4096, eval_contexts=8, ce_contexts=4, lr=3e-3, architecture=architecture,
                **EXTRA[architecture])
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", sorted(EXTRA))
def test_each_family_learns_and_saves_its_inference_rule(arch, tiny_llama, tiny_corpus, tmp_path):
    report = train_sae(tiny_llama, _cfg(tiny_corpus, arch), tmp_path / arch, progress=False)
    first, last = report["log"][0], report["log"][-1]
    assert last["fvu"] < first["fvu"] - 0.05, (first, last)  # 24 steps, still in the lr warm-up
    sae = load_sae(tmp_path / arch)
    assert sae.cfg.d_sae == 256 and sae.cfg.d_in == tiny_llama.d_model and sae.cfg.hook_name == HOOK
    x = torch.randn(20, sae.cfg.d_in)
    assert sae(x).codes.shape == (20, 256)
    if arch == "matryoshka":
        assert sae.cfg.architecture == "jumprelu" and sae.cfg.matryoshka_widths == [32, 96, 256]
        threshold = sae.state_dict()["threshold"]
        assert torch.unique(threshold).numel() == 1 and float(threshold[0]) >= 0
    else:
        assert sae.cfg.architecture == arch and sae.cfg.k == 8 and sae.cfg.inference_rule
    if arch == "feature_choice":
        threshold = sae.state_dict()["threshold"]
        assert threshold.shape == (256,) and (threshold >= 0).all() and threshold.std() > 0
    if arch == "mutual_choice":
        assert sae.cfg.global_threshold is not None and sae.cfg.global_threshold >= 0
    if arch in ("mutual_choice", "matryoshka"):  # the batch rule spends k per token on average
        assert last["l0"] == pytest.approx(8, abs=0.01) and last["l0_std"] > 0
    if arch == "gradient_topk":
        assert sae.cfg.gradient_beta == 4.0 and last["l0"] <= 8
    assert not checkpoint_dir(tmp_path / arch).exists()  # removed once the SAE is written


def test_matryoshka_prefix_losses_match_a_hand_formula():
    cfg = TrainConfig(hook_name=HOOK, corpus="unused", width=12, k=2, tokens=1, architecture="matryoshka",
                      matryoshka_widths="3,7,12")
    trainer = TRAINERS["matryoshka"](5, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen)
    codes = torch.randn(9, 12, generator=gen).relu()
    total_var = (x - x.mean(0)).pow(2).sum()
    got = trainer.extra_loss(x, codes, total_var)
    assert got is not None
    got = float(got.detach())
    W, b, xn, cn = (t.detach().double().numpy() for t in (trainer.W_dec, trainer.b_dec, x, codes))
    want = sum(((xn - (cn[:, :w] @ W[:w] + b)) ** 2).sum() for w in (3, 7)) / float(total_var)
    assert got == pytest.approx(want, rel=1e-5)


def test_aux_zipf_recruits_dead_and_under_used_latents():
    """Mutual choice: targets k / (rank * H_width) by firing-rate rank; feature choice: its capacity m/N."""
    width, k = 8, 2
    cfg = TrainConfig(hook_name=HOOK, corpus="unused", width=width, k=k, tokens=1, batch_size=16, buffer_tokens=16,
                      architecture="mutual_choice", dead_tokens=100)
    mc = TRAINERS["mutual_choice"](4, cfg, torch.device("cpu"))
    density = np.array([0.9, 0.05, 0.3, 0.2, 0.001, 0.12, 0.02, 0.08])
    mc.density.copy_(torch.tensor(density))
    harmonic = sum(1 / r for r in range(1, width + 1))
    ranks = np.empty(width)
    ranks[np.argsort(-density)] = np.arange(1, width + 1)
    want = density < np.minimum(k / (ranks * harmonic), 1.0)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(mc.aux_mask().numpy(), want)
    mc.since_fired[0] = 1000  # dead: recruited whatever its rate says
    assert bool(mc.aux_mask()[0])
    fc = TRAINERS["feature_choice"](4, dataclasses.replace(cfg, architecture="feature_choice"), torch.device("cpu"))
    fc.density.copy_(torch.tensor(density))
    m_over_n = max(1, k * 16 // width) / 16  # capacity 4 of 16 tokens
    np.testing.assert_array_equal(fc.aux_mask().numpy(), density < m_over_n)


def test_loss_gradient_at_the_hook_matches_finite_differences(tiny_llama):
    ids = torch.randint(1, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    acts, grad = hook_gradients(tiny_llama, HOOK.replace("1", "0"), ids)
    assert float(grad[0, -1].abs().max()) == 0.0  # the last position predicts no labelled token
    # central difference of the summed next-token loss along one direction at position 3
    direction = torch.randn(acts.shape[-1], generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    eps = 1e-3

    def loss_with(delta):
        def fn(act):
            act = act.clone()
            act[0, 3] += delta * direction
            return act

        with tiny_llama.hooks.intervene("blocks.0.hook_resid_post", fn), torch.no_grad():
            logits = tiny_llama.model(input_ids=ids, use_cache=False).logits.double()
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))

    numeric = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert float(grad[0, 3] @ direction) == pytest.approx(numeric, rel=2e-2, abs=1e-4)
    with pytest.raises(ValueError, match="no next-token labels"):
        hook_gradients(tiny_llama, HOOK, ids[:, :1])


@pytest.mark.parametrize("arch", ["gradient_topk", "mutual_choice"])
def test_an_interrupted_run_resumes_to_the_same_sae(arch, tiny_llama, tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, arch, checkpoint_minutes=0.0)
    straight = train_sae(tiny_llama, cfg, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_sae(tiny_llama, cfg, tmp_path / "resumed", progress=False, interrupt_after_checkpoints=1)
    assert checkpoint_dir(tmp_path / "resumed").is_dir() and not (tmp_path / "resumed" / "cfg.json").exists()
    with pytest.raises(ValueError, match="checkpoint of a train-sae run with other settings: k=8"):
        train_sae(tiny_llama, _cfg(tiny_corpus, arch, k=4), tmp_path / "resumed", progress=False)
    resumed = train_sae(tiny_llama, cfg, tmp_path / "resumed", progress=False)
    assert resumed["resumed_at_tokens"] == 4096 and resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["steps"] == straight["steps"]
    a, b = load_sae(tmp_path / "straight"), load_sae(tmp_path / "resumed")
    for name, tensor in a.named_parameters():
        assert torch.equal(tensor, getattr(b, name)), name
    assert a.cfg.global_threshold == b.cfg.global_threshold


def test_bad_family_settings(tiny_corpus):
    with pytest.raises(ValueError, match="matryoshka groups must sum to d_sae=256"):
        _cfg(tiny_corpus, "matryoshka", matryoshka_widths="32,96,200")
    with pytest.raises(ValueError, match="needs --matryoshka-widths"):
        _cfg(tiny_corpus, "matryoshka", matryoshka_widths="")
    with pytest.raises(ValueError, match="unknown --architecture"):
        TrainConfig(hook_name=HOOK, corpus="x", width=16, k=2, tokens=1, architecture="batchtopk")


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice", "matryoshka"])
def test_exported_thresholds_reproduce_the_batch_rule_on_their_batch(arch):
    """Stated agreement: every (token, latent) decision on the one batch they were calibrated on (100%)."""
    cfg = TrainConfig(hook_name=HOOK, corpus="unused", width=64, k=4, tokens=1, batch_size=48, buffer_tokens=48,
                      architecture=arch, matryoshka_widths="16,64" if arch == "matryoshka" else "")
    trainer = TRAINERS[arch](12, cfg, torch.device("cpu"))
    trainer.autocast = False
    x = torch.randn(48, 12, generator=torch.Generator().manual_seed(5))
    trainer.init_b_dec(x)
    trainer.step(x, 1.0)  # weights that are not the initial ones
    trainer.calibrate(x)
    sae = trainer.export(HOOK, "tiny", torch.float32)
    with torch.no_grad():
        batch_rule = trainer.select((x - trainer.b_dec) @ trainer.W_enc + trainer.b_enc, None)
    assert torch.equal(sae.encode(x) > 0, batch_rule > 0)
    torch.testing.assert_close(sae.encode(x), batch_rule, atol=1e-5, rtol=1e-5)


def test_gradient_trainer_selects_with_the_gradient():
    cfg = TrainConfig(hook_name=HOOK, corpus="unused", width=32, k=3, tokens=1, architecture="gradient_topk",
                      gradient_beta=30.0)
    trainer = TRAINERS["gradient_topk"](8, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(6)
    pre, grad = torch.randn(10, 32, generator=gen), torch.randn(10, 8, generator=gen)
    got = trainer.select(pre, grad)
    W = trainer.W_dec.detach().double().numpy()
    for i in range(10):
        z = pre[i].double().numpy()
        score = z + 30.0 * z * np.abs(W @ grad[i].double().numpy())
        keep = np.argsort(-score)[:3]
        want = np.zeros(32)
        want[keep] = np.maximum(z[keep], 0)
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="needs the loss gradient"):
        trainer.select(pre, None)
