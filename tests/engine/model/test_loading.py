"""Loading models from disk, devices and dtypes, and the errors a user can hit."""

import pytest
import torch

from engine import load_model
from engine.model.loading import resolve_device, resolve_dtype
from engine.model.tiny import save_tiny_model


def test_load_local_directory(tmp_path):
    path = save_tiny_model(tmp_path / "m", "gpt2")
    lm = load_model(path, device="cpu", dtype="float32")
    assert lm.device.type == "cpu" and lm.dtype == torch.float32 and lm.family.name == "gpt2"
    assert "blocks.1.hook_resid_post" in lm.hook_points()
    ids = lm.tokenizer("hello world", return_tensors="pt").input_ids
    assert lm.logits(ids).shape == (1, ids.shape[1], lm.config.vocab_size)


def test_dtype_and_device_resolution(monkeypatch, tmp_path):
    from engine.model import machine

    # auto device: cuda, else mps, else cpu (availability stubbed, so every branch runs on any machine)
    for cuda, mps, expected in ((True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert resolve_device("auto") == torch.device(expected), (cuda, mps)
    monkeypatch.undo()
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16

    # auto dtype on a CPU: bf16 only where the micro-benchmark (here given) finds it at least 1.25x faster than fp32
    cases = ((3.2, 0.8, torch.bfloat16), (1.25, 1.0, torch.bfloat16), (1.0, 0.9, torch.float32),
             (218.0, 11566.0, torch.float32))
    for i, (fp32_ms, bf16_ms, expected) in enumerate(cases):
        monkeypatch.setenv("SAESCOPE_CACHE_DIR", str(tmp_path / f"cache{i}"))  # each case measured, none cached
        widths: list[int] = []
        monkeypatch.setattr(machine, "benchmark_cpu", lambda width, w=widths, t=(fp32_ms, bf16_ms): w.append(width) or t)
        assert resolve_dtype("auto", torch.device("cpu"), width=64) == expected, (fp32_ms, bf16_ms)
        assert widths == [64]
    # and on accelerators: bf16 on CUDA (fp16 where unsupported), fp16 on MPS
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    monkeypatch.undo()

    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_in_bfloat16(tmp_path):
    lm = load_model(save_tiny_model(tmp_path / "m", "llama"), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    acts = lm.capture(torch.tensor([[1, 2, 3]]), "blocks.0.hook_resid_post")
    assert acts["blocks.0.hook_resid_post"].dtype == torch.bfloat16


def test_hub_id_offline_names_the_id():
    with pytest.raises(ValueError, match="could not load model 'some-org/not-a-model'.*offline"):
        load_model("some-org/not-a-model")


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_unsupported_family(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model family 'bert'"):
        load_model(tmp_path)
