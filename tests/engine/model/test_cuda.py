"""On a CUDA device: where the model lands, what ``auto`` picks, and activations equal to the CPU's (run by
scripts/gpu_check.sh; skipped with the reason where torch sees no CUDA device)."""

import pytest
import torch

from engine.model.loading import load_model, resolve_device
from engine.model.machine import choose_dtype
from engine.model.tiny import save_tiny_model

pytestmark = pytest.mark.cuda


def test_auto_device_and_dtype_on_cuda(tmp_path):
    assert resolve_device("auto").type == "cuda"
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert choose_dtype(torch.device("cuda")).torch_dtype == want
    lm = load_model(save_tiny_model(tmp_path / "m"), device="auto", dtype="auto")
    assert lm.device.type == "cuda" and lm.dtype == want
    assert {p.device.type for p in lm.model.parameters()} == {"cuda"}


def test_cuda_activations_equal_the_cpu_ones(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    ids = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"
    cpu = load_model(path, device="cpu", dtype="float32").capture(ids, hook)[hook]
    gpu = load_model(path, device="cuda", dtype="float32").capture(ids, hook)[hook]
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
