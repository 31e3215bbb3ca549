"""Several SAEs trained in one pass over the activations (``train_saes``, ``train-sae --architecture A,B``): each
equals the SAE trained alone with its settings, bit for bit, and an interrupted pass resumes to the same SAEs."""

import json
import shutil

import pytest
import torch

from engine import load_sae
from engine.cli import main
from engine.model.tiny import save_tiny_model
from engine.train import TrainConfig, train_sae, train_saes
from engine.train.checkpoint import NEXT_MARK, checkpoint_dir

HOOK = "blocks.1.hook_resid_post"
EXTRA = {"gradient_topk": {"gradient_beta": 4.0}, "feature_choice": {}, "mutual_choice": {}, "topk": {},
         "matryoshka": {"matryoshka_widths": "16,64,128"}}


def _cfg(tiny_corpus, arch, **kw):
    base = dict(hook_name=HOOK, corpus=str(tiny_corpus), width=128, k=6, tokens=6144, context_len=64, batch_size=512,
                buffer_tokens=2048, eval_contexts=4, ce_contexts=2, lr=3e-3, architecture=arch, calibration_contexts=8,
                **EXTRA[arch])
    return TrainConfig(**{**base, **kw})


def _same(a_dir, b_dir):
    a, b = load_sae(a_dir), load_sae(b_dir)
    assert a.cfg.architecture == b.cfg.architecture
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert a.cfg.global_threshold == b.cfg.global_threshold


@pytest.mark.parametrize("archs", [("feature_choice", "matryoshka"), ("topk", "gradient_topk")])
def test_each_sae_of_a_pass_equals_the_sae_trained_alone(archs, tiny_llama, tiny_corpus, tmp_path):
    alone = [train_sae(tiny_llama, _cfg(tiny_corpus, a), tmp_path / f"alone_{a}", progress=False) for a in archs]
    together = train_saes(tiny_llama, [_cfg(tiny_corpus, a) for a in archs], [tmp_path / f"pass_{a}" for a in archs],
                          progress=False)
    for a, one, both in zip(archs, alone, together, strict=True):
        _same(tmp_path / f"alone_{a}", tmp_path / f"pass_{a}")
        assert both["log"] == one["log"] and both["heldout"] == one["heldout"]
        assert both["settings"]["trained_in_one_pass_with"] == list(archs)
    # the two SAEs of the pass are not one SAE twice
    assert not torch.equal(load_sae(tmp_path / f"pass_{archs[0]}").W_enc, load_sae(tmp_path / f"pass_{archs[1]}").W_enc)


def test_an_interrupted_pass_resumes_to_the_same_saes(tiny_llama, tiny_corpus, tmp_path):
    archs = ("mutual_choice", "gradient_topk")
    cfgs = [_cfg(tiny_corpus, a, checkpoint_minutes=0.0) for a in archs]
    straight = [tmp_path / f"straight_{a}" for a in archs]
    resumed = [tmp_path / f"resumed_{a}" for a in archs]
    ckpts = [checkpoint_dir(o) for o in resumed]
    nexts = [c.with_name(c.name + NEXT_MARK) for c in ckpts]
    train_saes(tiny_llama, cfgs, straight, progress=False)
    saved = {}
    for gen in (1, 2):  # each call resumes the last one and stops after one more checkpoint
        with pytest.raises(KeyboardInterrupt):
            train_saes(tiny_llama, cfgs, resumed, progress=False, interrupt_after_checkpoints=1)
        assert [json.loads((c / "progress.json").read_text())["buffers"] for c in ckpts] == [gen, gen]
        for i, c in enumerate(ckpts):
            saved[i, gen] = tmp_path / f"saved_{i}_{gen}"
            shutil.copytree(c, saved[i, gen])

    def leave(state):  # what a kill inside save_pass leaves: {(sae, folder): generation}
        for path in (*ckpts, *nexts):
            shutil.rmtree(path, ignore_errors=True)
        for (i, where), gen in state.items():
            shutil.copytree(saved[i, gen], (ckpts if where == "ckpt" else nexts)[i])

    # killed while moving generation 2 into place: the first moved, the second still beside its folder
    leave({(0, "ckpt"): 2, (1, "ckpt"): 1, (1, "next"): 2})
    assert train_saes(tiny_llama, cfgs, resumed, progress=False)[0]["resumed_at_tokens"] == 4096
    for a, b in zip(straight, resumed, strict=True):
        _same(a, b)
    assert not any(p.exists() for p in (*ckpts, *nexts))
    # killed while writing generation 2 aside: only the first SAE's was written; both resume at generation 1
    leave({(0, "ckpt"): 1, (0, "next"): 2, (1, "ckpt"): 1})
    assert train_saes(tiny_llama, cfgs, resumed, force=True, progress=False)[0]["resumed_at_tokens"] == 2048
    for a, b in zip(straight, resumed, strict=True):
        _same(a, b)
    # checkpoints of different points with no generation in common: refused
    leave({(0, "ckpt"): 2, (1, "ckpt"): 1})
    with pytest.raises(ValueError, match="checkpoints of this train-sae pass do not match"):
        train_saes(tiny_llama, cfgs, resumed, force=True, progress=False)
    # one SAE of the pass without any checkpoint: refused, naming it
    leave({(0, "ckpt"): 1})
    with pytest.raises(ValueError, match="has none"):
        train_saes(tiny_llama, cfgs, resumed, force=True, progress=False)


def test_cli_trains_a_pass_and_refuses_mismatched_lists(tiny_corpus, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    common = ["train-sae", "--model", str(model), "--dtype", "float32", "--hook", HOOK, "--corpus", str(tiny_corpus), "--width",
              "64", "--k", "4", "--tokens", "1024", "--context-len", "64", "--batch-size", "512", "--buffer-tokens",
              "1024", "--eval-contexts", "2", "--ce-contexts", "1"]
    a, b = tmp_path / "fc", tmp_path / "mat"
    assert main([*common, "--architecture", "feature_choice,matryoshka", "--out", f"{a},{b}"]) == 2
    assert "matryoshka needs --matryoshka-widths" in capsys.readouterr().err
    assert main([*common, "--architecture", "feature_choice,mutual_choice", "--out", str(a)]) == 2
    assert "one folder per family" in capsys.readouterr().err
    assert main([*common, "--architecture", "feature_choice,matryoshka", "--matryoshka-widths", "16,64",
                 "--out", f"{a},{b}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["architecture"] for s in shown] == ["feature_choice", "matryoshka"]
    assert load_sae(a).cfg.architecture == "feature_choice" and load_sae(b).cfg.matryoshka_widths == [16, 64]
