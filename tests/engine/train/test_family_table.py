"""The family table on a tiny model: its metrics recomputed by hand (numpy) for one family, and steering
effectiveness on a planted latent whose decoder direction is a token's unembedding direction."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from engine import load_sae
from engine.cli import main
from engine.data.corpus import iter_contexts
from engine.model.tiny import save_tiny_model
from engine.saes import SAEConfig, build_sae
from engine.train.family_table import FamilyTableConfig, Steerer, family_table, promoted_tokens, read_family_table, steer_latent

HOOK = "blocks.1.hook_resid_post"  # the tiny llama's last layer: the unembedding follows its final norm


def _mutual_choice(d_in, d_sae, seed, threshold):
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    state = {"W_enc": W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=gen), "W_dec": W_dec,
             "b_enc": 0.1 * torch.randn(d_sae, generator=gen), "b_dec": 0.05 * torch.randn(d_in, generator=gen)}
    cfg = SAEConfig(architecture="mutual_choice", d_in=d_in, d_sae=d_sae, hook_name=HOOK, k=4,
                    global_threshold=threshold)
    return build_sae(cfg, state)


def _by_hand(lm, sae, contexts, ce_contexts):
    """L0 per token, EV, silent/dense fractions, CE loss recovered and KL with numpy (one model batch)."""
    ids = torch.tensor(contexts, dtype=torch.long)
    acts = lm.capture(ids, HOOK)[HOOK].double().numpy()
    counted = np.ones(ids.shape, bool)
    counted[:, 0] = False
    counted &= ids.numpy() != 0  # the tiny tokenizer's one special token
    norms = np.linalg.norm(acts, axis=-1)
    massive = counted & (norms >= 10 * np.median(norms[counted]))
    mask = counted & ~massive
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))

    def encode(x):
        pre = (x - b_dec) @ W_enc + b_enc
        return np.maximum(pre, 0) * (pre > sae.cfg.global_threshold)

    x = acts[counted]
    codes = encode(x)
    recon = codes @ W_dec + b_dec
    ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    fires = (codes > 0).sum(0)
    out = {"l0": (codes > 0).sum(1), "ev": ev, "silent": (fires == 0).mean(), "dense": (fires / len(x) > 0.1).mean()}
    # CE: the SAE's reconstruction (or zeros) replaces the activation where ``mask`` holds
    ids_ce, m = ids[:ce_contexts], torch.tensor(mask[:ce_contexts])
    full = encode(acts[:ce_contexts]) @ W_dec + b_dec

    def run(replacement):
        def fn(act):
            if replacement is None:
                return act
            return torch.where(m[..., None], torch.tensor(replacement, dtype=act.dtype), act)

        with lm.hooks.intervene(HOOK, fn), torch.no_grad():
            logits = lm.model(input_ids=ids_ce, use_cache=False).logits.double()
        return torch.log_softmax(logits[:, :-1], -1).numpy()

    clean, spliced, zero = run(None), run(full), run(np.zeros_like(full))
    tgt = ids_ce[:, 1:].numpy()
    pred = m[:, :-1].numpy()

    def loss(logp):
        return -np.take_along_axis(logp, tgt[..., None], -1)[..., 0][pred].mean()

    out["ce_rec"] = (loss(zero) - loss(spliced)) / (loss(zero) - loss(clean))
    out["kl"] = (np.exp(clean) * (clean - spliced)).sum(-1)[pred].mean()
    return out


def test_family_table_metrics_match_a_hand_computation(tiny_llama, tiny_corpus, tmp_path):
    saes = []
    for name, threshold in (("mc_low", 0.2), ("mc_high", 0.9)):
        saes.append(tmp_path / name)
        _mutual_choice(tiny_llama.d_model, 48, seed=len(saes), threshold=threshold).save(saes[-1])
    cfg = FamilyTableConfig(eval_corpus=str(tiny_corpus), eval_contexts=6, ce_contexts=3, context_len=32, model_batch=8,
                            steer_latents=2, steer_contexts=2, steer_len=16, steer_prompt=4, steer_max_strength=4.0)
    table = family_table(tiny_llama, saes, cfg, tmp_path / "table")
    contexts = list(iter_contexts(tiny_llama.tokenizer, str(tiny_corpus), 32))[:6]
    for path, row in zip(saes, table.to_dict("records"), strict=True):
        want = _by_hand(tiny_llama, load_sae(path), contexts, 3)
        assert row["sae"] == path.name and row["architecture"] == "mutual_choice"
        assert row["l0_mean"] == pytest.approx(want["l0"].mean(), rel=1e-9)
        for p in (5, 50, 95):
            assert row[f"l0_p{p}"] == pytest.approx(np.percentile(want["l0"], p))
        assert row["explained_variance"] == pytest.approx(want["ev"], abs=1e-5)
        assert row["heldout_silent_fraction"] == pytest.approx(want["silent"])
        assert row["dense_fraction"] == pytest.approx(want["dense"])
        assert row["ce_loss_recovered"] == pytest.approx(want["ce_rec"], rel=1e-4)
        assert row["kl_div"] == pytest.approx(want["kl"], rel=1e-3, abs=1e-6)
        assert row["dead_fraction_training"] is None  # no training report in these folders
    assert table["l0_mean"].iloc[0] > table["l0_mean"].iloc[1]  # a lower threshold fires more
    found = read_family_table(tmp_path / "table")
    assert found is not None
    written, info = found
    assert written.equals(table)
    hist = info["saes"]["mc_low"]["l0_histogram"]
    assert sum(hist["counts"]) == table["n_tokens"].iloc[0]
    assert "| mc_low | mutual_choice |" in info["markdown"]
    assert len(info["saes"]["mc_low"]["steering"]) == 2


def test_adding_an_sae_measures_it_alone_and_keeps_the_rows_already_measured(tiny_llama, tiny_corpus, tmp_path):
    folders = [tmp_path / n for n in ("a", "b", "c")]
    for seed, folder in enumerate(folders):
        _mutual_choice(tiny_llama.d_model, 48, seed=seed, threshold=0.2 + 0.2 * seed).save(folder)
    cfg = FamilyTableConfig(eval_corpus=str(tiny_corpus), eval_contexts=4, ce_contexts=2, context_len=32, model_batch=8,
                            steer_latents=2, steer_contexts=2, steer_len=16, steer_prompt=4, steer_max_strength=4.0)
    out = tmp_path / "table"
    family_table(tiny_llama, folders[:2], cfg, out)
    grown = family_table(tiny_llama, folders, cfg, out)
    assert read_family_table(out)[1]["measured"] == ["c"]
    alone = family_table(tiny_llama, folders, cfg, tmp_path / "fresh")  # every row measured in one run
    assert read_family_table(tmp_path / "fresh")[1]["measured"] == ["a", "b", "c"]
    pd.testing.assert_frame_equal(grown, alone, check_dtype=False)
    # new weights in a folder: that row is measured again, and it changes
    _mutual_choice(tiny_llama.d_model, 48, seed=7, threshold=0.2).save(folders[0])
    changed = family_table(tiny_llama, folders, cfg, out)
    assert read_family_table(out)[1]["measured"] == ["a"]
    assert changed["l0_mean"].iloc[0] != grown["l0_mean"].iloc[0]
    assert changed.iloc[1:].reset_index(drop=True).equals(grown.iloc[1:].reset_index(drop=True))
    # other settings: nothing is kept
    family_table(tiny_llama, folders, dataclasses.replace(cfg, steer_latents=1), out)
    assert read_family_table(out)[1]["measured"] == ["a", "b", "c"]
    family_table(tiny_llama, folders, dataclasses.replace(cfg, steer_latents=1), out, reuse=False)
    assert read_family_table(out)[1]["measured"] == ["a", "b", "c"]


def _final_logp(lm, resid):
    """log-softmax of the logits from the last residual ``[.., d]`` by hand: RMSNorm, its weight, the unembedding."""
    norm = lm.final_norm()
    w, eps = norm.weight.detach().double().numpy(), norm.variance_epsilon
    h = resid / np.sqrt((resid**2).mean(-1, keepdims=True) + eps) * w
    logits = h @ lm.unembed_matrix().detach().double().numpy().T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_steering_a_planted_token_direction_shifts_its_log_prob_by_the_hand_computed_amount(tiny_llama, tiny_corpus):
    W_U = tiny_llama.unembed_matrix().detach().double()
    g = tiny_llama.final_norm_scale().double()
    token = int(W_U.norm(dim=-1).argmax())  # the longest unembedding row: its own direction promotes it most
    direction = (W_U[token] / g).float()  # through the final norm's scale it is W_U[token]'s direction
    assert promoted_tokens(tiny_llama, direction, 3)[0] == token
    ids = torch.tensor([c[:20] for c in list(iter_contexts(tiny_llama.tokenizer, str(tiny_corpus), 32))[:3]])
    prompt = 5
    steerer = Steerer(tiny_llama, HOOK, ids, prompt)
    unit = direction / direction.norm()
    strengths = torch.tensor([0.5, 2.0, 6.0])
    effect, cost = steerer.curve(unit, strengths, torch.tensor([token]))
    resid = tiny_llama.capture(ids, HOOK)[HOOK].double().numpy()
    base = _final_logp(tiny_llama, resid)[:, prompt:-1]
    targets = ids[:, prompt + 1 :].numpy()[..., None]
    for s, e, c in zip(strengths.tolist(), effect.tolist(), cost.tolist(), strict=True):
        steered = _final_logp(tiny_llama, resid + s * unit.double().numpy())[:, prompt:-1]
        assert e == pytest.approx((steered[..., token] - base[..., token]).mean(), rel=1e-3, abs=1e-5)
        want_cost = (np.take_along_axis(base, targets, -1) - np.take_along_axis(steered, targets, -1)).mean()
        assert c == pytest.approx(want_cost, rel=1e-3, abs=1e-5)
    assert effect[-1] > effect[0] > 0  # the planted token gains with the strength
    # the strength at equal fluency cost: the search lands where the loss rose by the target (a random tiny model
    # is near uniform: its loss rises by a few hundredths at most, with activation norms ~0.2)
    cfg = FamilyTableConfig(eval_corpus="unused", steer_top_tokens=1, steer_prompt=prompt, steer_len=20,
                            steer_fluency_cost=0.02, steer_max_strength=8.0)
    scale = 0.1
    record = steer_latent(steerer, direction, scale, cfg)
    assert record["reached"] and record["promoted_tokens"] == [token]
    assert record["fluency_cost"] == pytest.approx(0.02, rel=0.05)
    s = record["strength"] * scale
    steered = _final_logp(tiny_llama, resid + s * unit.double().numpy())[:, prompt:-1]
    assert record["shift"] == pytest.approx((steered[..., token] - base[..., token]).mean(), rel=1e-3)
    assert record["shift_per_unit"] == pytest.approx(record["shift"] / record["strength"])


def test_family_table_command(tiny_corpus, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    _mutual_choice(64, 32, seed=3, threshold=0.3).save(tmp_path / "mc")
    args = ["family-table", "--model", str(model), "--dtype", "float32", str(tmp_path / "mc"), "--eval-corpus",
            str(tiny_corpus), "--eval-contexts", "2", "--ce-contexts", "1", "--context-len", "32", "--steer-latents",
            "1", "--steer-contexts", "1", "--steer-len", "16", "--steer-prompt", "4", "--out", str(tmp_path / "t")]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("| SAE | family | L0 mean |")
    info = json.loads((tmp_path / "t" / "family_table.json").read_text())
    assert info["hook"] == HOOK and info["settings"]["steer_latents"] == 1
    assert main([*args[:-2], "--steer-prompt", "15", "--out", str(tmp_path / "t")]) == 2
    assert "--steer-prompt must be between 1 and --steer-len - 2" in capsys.readouterr().err


def test_steering_resumed_from_the_hook_equals_the_hooked_full_forward(tiny_llama, tiny_corpus):
    """A residual hook's steered forwards resume from the captured activation; the same as adding at the hook."""
    ids = torch.tensor([c[:20] for c in list(iter_contexts(tiny_llama.tokenizer, str(tiny_corpus), 32))[:2]])
    resumed = Steerer(tiny_llama, "blocks.0.hook_resid_post", ids, 4)
    full = Steerer(tiny_llama, "blocks.0.hook_resid_post", ids, 4)
    full.resid = None  # the hooked full forward, as for hooks a forward cannot resume from
    assert resumed.resid is not None
    vector = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(2))
    strengths, tokens = torch.tensor([0.1, 1.0, 3.0]), torch.tensor([5, 17])
    for a, b in zip(resumed.curve(vector, strengths, tokens), full.curve(vector, strengths, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
