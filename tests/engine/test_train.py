"""The TopK trainer on a tiny model, its output directory, and its refusals."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import load_sae
from engine.model.tiny import TINY_TEXT
from engine.train import TrainConfig, train_sae

HOOK = "blocks.1.hook_resid_post"


def _cfg(tiny_corpus, **kw):
    base = dict(hook_name=HOOK, corpus=str(tiny_corpus), width=256, k=8, tokens=30_000, context_len=64, batch_size=512,
                buffer_tokens=8192, eval_contexts=8, ce_contexts=4, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def test_trainer_learns_and_writes_a_loadable_sae(tiny_llama, tiny_corpus, tmp_path):
    report = train_sae(tiny_llama, _cfg(tiny_corpus), tmp_path / "sae", progress=False)
    first, last = report["log"][0], report["log"][-1]
    assert 1 - last["fvu"] > (1 - first["fvu"]) + 0.2, (first, last)
    assert report["heldout"]["explained_variance"] > 0.5
    assert report["tokens_seen"] == 30_000
    for key in ("mse", "l0", "dead_fraction", "heldout_silent_fraction", "dense_fraction", "ce_loss_clean", "ce_loss_with_sae",
                "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div"):
        assert key in report["heldout"]
    assert report["heldout"]["l0"] == pytest.approx(8, abs=0.5)
    on_disk = json.loads((tmp_path / "sae" / "training_report.json").read_text())
    assert on_disk["tokens_seen"] == 30_000 and on_disk["settings"]["width"] == 256
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 8 and sae.cfg.hook_name == HOOK
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)


def test_refuses_existing_output(tiny_llama, tiny_corpus, tmp_path):
    out = tmp_path / "sae"
    out.mkdir()
    (out / "cfg.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds an SAE; pass --force"):
        train_sae(tiny_llama, _cfg(tiny_corpus), out, progress=False)


def test_bad_settings(tiny_llama, tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="--k must satisfy"):
        _cfg(tiny_corpus, k=256)
    with pytest.raises(ValueError, match="unknown hook point"):
        train_sae(tiny_llama, _cfg(tiny_corpus, hook_name="blocks.5.hook_resid_post"), tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_sae(tiny_llama, _cfg(tmp_path / "missing.txt"), tmp_path / "b", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        train_sae(tiny_llama, _cfg(empty), tmp_path / "c", progress=False)


def test_corpus_smaller_than_one_batch(tiny_llama, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(TINY_TEXT * 3)
    cfg = TrainConfig(hook_name=HOOK, corpus=str(small), width=64, k=4, tokens=10_000, context_len=32,
                      batch_size=4096, buffer_tokens=8192, eval_contexts=2, ce_contexts=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_sae(tiny_llama, cfg, tmp_path / "out", progress=False)


def test_interrupt_leaves_no_sae(tmp_path, tiny_corpus):
    """Ctrl-C during training: exit code 130 and no directory that looks like a finished SAE."""
    from engine.model.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps({"text": TINY_TEXT + f" Document {i}."}) for i in range(50_000)))
    out = tmp_path / "sae"
    cmd = [sys.executable, "-m", "engine.cli", "train-sae", "--model", str(model), "--dtype", "float32", "--hook", HOOK,
           "--corpus", str(big), "--width", "256", "--k", "8", "--tokens", "50000000", "--context-len", "64",
           "--batch-size", "512", "--out", str(out)]
    # unbuffered: the progress bar's first line reaches us at once (~6M tokens of corpus: minutes of training)
    # started as a terminal starts it (SIGINT handled), even under a runner that ignores SIGINT (children inherit that)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the progress bar shows the loss once the first optimisation step is done: training is under way
    seen = b""
    deadline = time.monotonic() + 120  # generous for a loaded machine; normally seconds
    try:
        while b"loss=" not in seen:
            ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no training step within 120 s: {seen.decode(errors='replace')[-2000:]}"
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"train-sae exited ({proc.wait(timeout=60)}) before its first step: {seen.decode(errors='replace')}"
            seen += chunk
    except BaseException:
        proc.kill()  # not minutes of training left behind
        raise
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)  # generous for a loaded machine; normally seconds
    err = (seen + err).decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert not (out / "cfg.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sae.tmp")]


@pytest.mark.parametrize("n_dead", [3, 20])
def test_auxk_loss_is_scaled_by_the_dead_count(n_dead):
    """The step's loss is fvu + aux_coef * min(n_dead / (d_in // 2), 1) * aux, checked through its gradient."""
    from engine.train import TopKTrainer

    d_in, width, k, coef = 16, 64, 4, 0.5
    cfg = TrainConfig(hook_name=HOOK, corpus="unused", width=width, k=k, tokens=1, dead_tokens=100, aux_coef=coef)
    trainer = TopKTrainer(d_in, cfg, torch.device("cpu"))
    trainer.autocast = False  # exact fp32 so the hand computation matches
    x = torch.randn(32, d_in, generator=torch.Generator().manual_seed(1))
    trainer.init_b_dec(x)
    dead = torch.zeros(width, dtype=torch.bool)
    dead[torch.randperm(width, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    trainer.since_fired[dead] = 101
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                  (trainer.W_enc, trainer.b_enc, trainer.W_dec, trainer.b_dec))

    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    err = x - (codes @ W_dec + b_dec)
    fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    k_aux = min(d_in // 2, n_dead)
    dead_top = pre[:, dead].topk(k_aux, dim=-1)
    aux_codes = torch.zeros(32, n_dead).scatter(-1, dead_top.indices, dead_top.values.relu())
    e = err.detach()
    aux = (aux_codes @ W_dec[dead] - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    scale = min(n_dead / (d_in // 2), 1.0)
    assert scale == (3 / 8 if n_dead == 3 else 1.0)
    (fvu + coef * scale * aux).backward()

    trainer.step(x, lr_scale=1.0)
    # the trainer keeps this step's gradients; W_enc's and b_enc's are not projected
    torch.testing.assert_close(trainer.W_enc.grad, W_enc.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.b_enc.grad, b_enc.grad, atol=1e-5, rtol=1e-4)
    assert aux.item() > 0 and float(b_enc.grad[dead].abs().sum()) > 0  # the aux term reached the dead latents
