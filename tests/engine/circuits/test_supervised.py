import itertools
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from engine.circuits import tasks
from engine.circuits.ioi_attributes import io_counterfactual, ioi_prompts
from engine.circuits.supervised import exchange_codes, f1_table, mean_codes
from engine.circuits.supervised_files import read_supervised, write_supervised
from engine.circuits.supervised_run import MIN_MOVED, SupervisedConfig, capture_at, last_logits, run_supervised, sae_edit
from engine.circuits.tasks import ioi_names
from engine.model.loading import from_module
from engine.model.tiny import tiny_config
from engine.saes import SAEConfig, build_sae

HOOK = "blocks.0.hook_resid_post"  # layer 1 reads every position of it


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE that keeps the IOI words whole (they are frequent in its training text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = list(tasks.NAMES + tasks.PLACES + tasks.OBJECTS)
    text = " ".join(t.format(X="a", Y="b", S="c", place="d", obj="e") for t in tasks.IOI_TEMPLATES)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text + " " + " ".join(words)] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def lm(tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok), d_model=32, n_heads=4))
    return from_module(model, tok, name="tiny-llama")


def identity_sae(d: int, hook: str = HOOK):
    """A ReLU SAE whose reconstruction is its input: latents +x_i and -x_i."""
    eye = torch.eye(d)
    state = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d), "W_dec": torch.cat([eye, -eye], 0),
             "b_dec": torch.zeros(d)}
    return build_sae(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d, hook_name=hook), state)


def test_mean_codes_recover_planted_attribute_vectors():
    g = torch.Generator().manual_seed(0)
    values = {"io": ["Ann", "Bob", "Cy"], "s": ["Dee", "Eve"], "io_pos": ["ABBA", "BABA"]}
    planted = {a: {v: torch.randn(8, generator=g) for v in vs} for a, vs in values.items()}
    for codes in planted.values():  # centred over the values: the dictionary's convention
        centre = torch.stack(list(codes.values())).mean(0)
        for v in codes:
            codes[v] = codes[v] - centre
    mean = torch.randn(8, generator=g)
    rows = list(itertools.product(*values.values())) * 2  # a full factorial design, twice
    labels = {a: [r[i] for r in rows] for i, a in enumerate(values)}
    x = torch.stack([mean + sum(planted[a][r[i]] for i, a in enumerate(values)) for r in rows])
    d = mean_codes(x, labels)
    torch.testing.assert_close(d.mean, mean, atol=1e-5, rtol=0)
    for a, codes in planted.items():
        for v, u in codes.items():
            torch.testing.assert_close(d.vectors[a][v], u, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.reconstruct(labels), x, atol=1e-5, rtol=0)
    # the supervised edit of the IO attribute is the planted representation with the other IO, by hand
    edited = d.edit(x[:1], "io", ["Ann"], ["Cy"])
    r = rows[0]
    assert r[0] == "Ann"
    torch.testing.assert_close(edited[0], mean + planted["io"]["Cy"] + planted["s"][r[1]] + planted["io_pos"][r[2]],
                               atol=1e-5, rtol=0)


def test_f1_equals_scikit_learn():
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["Ann", "Bob", "Cy", "Dee"], 40))
    active = rng.random((40, 8)) < 0.3
    active[:, 3] = False  # a dead latent: precision 0/0, F1 0 as with zero_division=0
    active[:, 4] = [w == "Bob" for w in labels]  # a perfect latent
    t = f1_table(active, labels)
    zero: dict = {"zero_division": 0}
    for j, (v, value) in itertools.product(range(8), enumerate(t.values)):
        truth = [w == value for w in labels]
        assert t.f1[j, v] == pytest.approx(f1_score(truth, active[:, j], **zero))
        assert t.precision[j, v] == pytest.approx(precision_score(truth, active[:, j], **zero))
        assert t.recall[j, v] == pytest.approx(recall_score(truth, active[:, j], **zero))
    assert t.best()[t.values.index("Bob")] == 1.0 and t.ranked("Bob")[0] == 4


def test_exchange_edit_by_hand():
    codes = torch.tensor([[3.0, 0.0, 2.0, 1.0, 0.0]])
    cf_codes = torch.tensor([[0.0, 5.0, 0.0, 1.5, 4.0]])
    remove, add = [np.array([1, 2, 0, 3])], [np.array([2, 4, 3, 1])]
    delta, removed, added = exchange_codes(codes, cf_codes, remove, add, 2)
    # remove: latent 1 is not active, so 2 then 0; add: 2 is not active on the counterfactual, so 4 then 3
    assert removed == [[2, 0]] and added == [[4, 3]]
    torch.testing.assert_close(delta, torch.tensor([[-3.0, 0.0, -2.0, 1.5, 4.0]]))
    sae = identity_sae(5)
    x = torch.randn(1, 5)
    # latent i < 5 writes +e_i: the edit adds delta[:5] to x
    torch.testing.assert_close(sae_edit(sae, x, torch.cat([delta, torch.zeros(1, 5)], 1)), x + delta)
    # exchanging every latent of an exact SAE turns the activation into the counterfactual's
    x_cf = torch.randn(1, 5)
    everything = [np.arange(10)]
    delta, _, _ = exchange_codes(sae.encode(x), sae.encode(x_cf), everything, everything, 10)
    torch.testing.assert_close(sae_edit(sae, x, delta), x_cf, atol=1e-6, rtol=0)


def test_prompt_positions_and_counterfactuals(tok):
    import random

    names = ioi_names(tok)
    prompts = ioi_prompts(tok, 12, seed=3, names=names)
    assert {p.abba for p in prompts} == {True, False}
    for p in prompts:
        assert tok.decode([p.ids[p.s2]]) == " " + p.s and tok.decode([p.ids[p.io_at]]) == " " + p.io
        cf = io_counterfactual(tok, p, names, random.Random(0))
        diff = [i for i, (a, b) in enumerate(zip(p.ids, cf.ids, strict=True)) if a != b]
        assert diff == [p.io_at] and cf.io not in (p.io, p.s) and cf.s == p.s


def test_an_identity_sae_keeps_the_logit_difference_and_patching_own_values_changes_nothing(lm, tok, tmp_path):
    sae = identity_sae(lm.d_model)
    prompts = ioi_prompts(tok, 6, seed=1)
    clean = last_logits(lm, sae, HOOK, prompts, "end")
    for position in ("end", "s2", "io"):
        own = capture_at(lm, sae, HOOK, prompts, position)
        torch.testing.assert_close(last_logits(lm, sae, HOOK, prompts, position, own), clean, atol=1e-5, rtol=0)
    cfg = SupervisedConfig(fit_prompts=24, eval_prompts=8, max_exchange=2)
    result = run_supervised(lm, sae, cfg, seed=0, min_accuracy=0.0)
    assert [p.position for p in result.positions] == ["end", "s2", "io"]
    for p in result.positions:
        a = p.approximation
        assert a.ld_sae == pytest.approx(a.ld_clean, abs=1e-5)
        assert abs(a.ld_mean - a.ld_clean) > 1e-3  # mean-ablation moves it: the test can tell
        assert a.recovered(a.ld_sae) == pytest.approx(1.0, abs=1e-3)
        assert [c.k for c in p.control if c.method == "sae"] == [1, 2]
        patch = next(c for c in p.control if c.method == "patch")
        assert patch.success == 1.0 if p.n_moved >= MIN_MOVED else math.isnan(patch.success)
    folder = write_supervised(tmp_path / "circuits", result, "tiny-llama", "identity")
    info, control, f1 = read_supervised(tmp_path / "circuits", HOOK) or ({}, None, None)
    assert folder.name == HOOK and info["hook"] == HOOK and len(info["positions"]) == 3
    assert control is not None and f1 is not None
    assert set(control.column("method").to_pylist()) == {"patch", "none", "supervised", "sae"}
    assert set(f1.column("attribute").to_pylist()) == {"io", "s", "io_pos"}
    json.dumps(info, allow_nan=False)  # no NaN in the JSON


def test_an_sae_at_another_hook_is_refused(lm):
    sae = identity_sae(lm.d_model)
    with pytest.raises(ValueError, match=r"the SAE reads blocks.0.hook_resid_post, not blocks.1.hook_resid_post"):
        run_supervised(lm, sae, SupervisedConfig(fit_prompts=8, eval_prompts=2), hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="positions must be some of end, s2, io"):
        SupervisedConfig(positions=("bos",))
