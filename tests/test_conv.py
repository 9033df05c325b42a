"""The depthwise conv's own backward (fidelity.kernels.conv) against autograd through
``F.conv1d``: fresh random inputs, float64 gradients equal to 1e-12 (relative to the largest
magnitude), ``gradcheck`` by finite differences, and float32 within 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fidelity.kernels.conv import depthwise_conv1d
from fidelity.models.base import causal_conv1d


def make(batch, channels, length, width, dtype, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        tensor = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        return tensor.requires_grad_()

    padded = normal(batch, channels, length + width - 1)
    return padded, normal(channels, 1, width), normal(channels) if bias else None


def grads(function, padded, weight, bias, grad_out):
    inputs = [t for t in (padded, weight, bias) if t is not None]
    out = function(padded, weight, bias)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize(
    "batch,channels,length,width,bias",
    [
        (1, 8, 37, 4, True),
        (3, 5, 16, 4, True),
        (2, 6, 1, 4, False),
        (2, 7, 20, 2, True),
        (1, 4, 9, 1, True),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_autograd_float64(batch, channels, length, width, bias, seed):
    padded, weight, b = make(batch, channels, length, width, torch.float64, seed, bias)
    grad_out = torch.randn(batch, channels, length, dtype=torch.float64)

    def reference(p, w, bb):
        return F.conv1d(p, w, bb, groups=p.shape[1])

    out, ours = grads(depthwise_conv1d, padded, weight, b, grad_out)
    out_ref, theirs = grads(reference, padded, weight, b, grad_out)
    assert torch.equal(out, out_ref)
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine.shape == ref.shape
        assert (mine - ref).abs().max() <= 1e-12 * ref.abs().max().clamp(min=1)


def test_gradcheck_float64():
    padded, weight, bias = make(2, 3, 11, 4, torch.float64, seed=5)
    assert torch.autograd.gradcheck(depthwise_conv1d, (padded, weight, bias))


def test_float32_and_partial_gradients():
    padded, weight, bias = make(2, 16, 300, 4, torch.float32, seed=3)
    grad_out = torch.randn(2, 16, 300)
    _, ours = grads(depthwise_conv1d, padded, weight, bias, grad_out)
    _, theirs = grads(
        lambda p, w, b: F.conv1d(p, w, b, groups=p.shape[1]), padded, weight, bias, grad_out
    )
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine - ref).abs().max() <= 1e-5 * ref.abs().max()
    # Only the input needs a gradient (frozen conv): the others are not computed.
    frozen = weight.detach()
    (grad_padded,) = torch.autograd.grad(depthwise_conv1d(padded, frozen, None).sum(), [padded])
    assert grad_padded.shape == padded.shape


def test_causal_conv1d_with_prefix_matches_reference():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 25, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    prefix = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 6, 25, generator=gen, dtype=torch.float64)
    inputs = [x, weight, bias, prefix]
    out = causal_conv1d(x, weight, bias, prefix)
    ours = torch.autograd.grad(out, inputs, grad_out)
    padded = torch.cat([prefix, x], dim=-1)
    out_ref = F.conv1d(padded, weight, bias, groups=6)
    theirs = torch.autograd.grad(out_ref, inputs, grad_out)
    assert torch.equal(out, out_ref)
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine - ref).abs().max() <= 1e-12 * ref.abs().max()
