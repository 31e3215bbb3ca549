"""``wide_topk`` against ``torch.topk``: the same values (ties included), indices that point at them, no repeats."""

import pytest
import torch

from engine.saes.topk import wide_topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_wide_topk_keeps_torch_topk_values(dtype, ties):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4096, generator=gen)
    if ties:  # few distinct values: the k-th is tied across many blocks
        x = (x * 2).round()
    x = x.to(dtype)
    for k, block in ((4, 8), (16, 16), (7, 32)):
        values, indices = wide_topk(x, k, block=block)
        want = x.topk(k, dim=-1).values
        assert values.shape == indices.shape == (3, 5, k)
        torch.testing.assert_close(values.sort(-1, descending=True).values, want, rtol=0, atol=0)
        torch.testing.assert_close(x.gather(-1, indices), values, rtol=0, atol=0)
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct latents per token


def test_wide_topk_falls_back_to_one_topk_when_narrow():
    x = torch.randn(2, 100)
    values, indices = wide_topk(x, 5)
    ref = x.topk(5, dim=-1, sorted=False)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


def test_wide_topk_gradient_reaches_the_kept_values():
    x = torch.randn(2, 4096, requires_grad=True)
    values, indices = wide_topk(x, 4, block=16)
    values.sum().backward()
    expected = torch.zeros(2, 4096).scatter_(-1, indices, 1.0)
    assert x.grad is not None and torch.equal(x.grad, expected)
