"""The Mamba mixer's layout helpers: the convolution window kept across chunks and the
channel-major products, each against the plain formula they replace (fresh random inputs)."""

import pytest
import torch
import torch.nn.functional as F

from fidelity.models.base import conv_window
from fidelity.models.mamba import channel_major_product


@pytest.mark.parametrize("length", [1, 2, 3, 4, 50])
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_conv_window_equals_the_tail_of_the_whole_concatenation(length, keep):
    generator = torch.Generator().manual_seed(length * 10 + keep)
    window = torch.randn(2, 5, keep, generator=generator)
    x = torch.randn(2, length, 10, generator=generator).transpose(1, 2)[:, :5]  # strided view
    whole = torch.cat([window, x.double().float()], dim=-1)
    expected = whole[..., whole.shape[-1] - keep :]
    assert torch.equal(conv_window(window, x), expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_channel_major_product_equals_the_linear_map_and_its_gradients(batch):
    generator = torch.Generator().manual_seed(batch)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    hidden = torch.randn(batch, 11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    out = channel_major_product(weight, hidden)  # (batch, 7, 11)
    expected = F.linear(hidden, weight).transpose(1, 2)
    assert out.is_contiguous() and out.shape == (batch, 7, 11)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    mine = torch.autograd.grad(out, (weight, hidden), grad)
    theirs = torch.autograd.grad(expected, (weight, hidden), grad)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
