"""Depthwise 1-d convolution (the Mamba mixers' short causal conv) with its own backward.

Why not plain ``F.conv1d`` under autograd: on CPU, PyTorch's backward of a grouped conv is
oneDNN's depthwise backward kernel, and that kernel's time depends on the memory it is handed:
measured on the `mini` models, one call took 3 ms or 2 s for the same inputs. The slow calls
became rarer with ``torch.set_flush_denormal(True)`` and more frequent when freed memory held
denormal bit patterns (as freed int32/int64 tensors, such as MemMamba's pool indices, do when
read as float32), although no tensor of the model is denormal: the kernel seems to touch
recycled memory. It made the no-note-block ablation's training step up to 4x slower than
Mamba's (56% of it in that backward). Here the forward is the same ``F.conv1d`` call, and
the backward is written with operations that do not have that pathology: the input
gradient is a forward depthwise conv of the output gradient with the flipped kernel, the
weight gradient ``width`` dot products over time. The maths is unchanged (gradients checked
against autograd's in float64 in ``tests/test_conv.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv1d"]


class _DepthwiseConv1d(torch.autograd.Function):
    """``padded`` `(batch, channels, length + width - 1)`, ``weight`` `(channels, 1, width)`,
    ``bias`` `(channels,)` or None -> `(batch, channels, length)` (no padding added)."""

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(padded, weight)
        ctx.has_bias = bias is not None
        return F.conv1d(padded, weight, bias, groups=padded.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        padded, weight = ctx.saved_tensors
        width = weight.shape[-1]
        length = grad.shape[-1]
        grad = grad.contiguous()
        grad_padded = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d out[t] / d padded[t + k] = weight[k]: a full correlation with the flipped kernel.
            grad_padded = F.conv1d(
                F.pad(grad, (width - 1, width - 1)), weight.flip(-1), groups=grad.shape[1]
            )
        if ctx.needs_input_grad[1]:
            taps = [(grad * padded[..., k : k + length]).sum((0, 2)) for k in range(width)]
            grad_weight = torch.stack(taps, dim=-1)[:, None]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_padded, grad_weight, grad_bias


def depthwise_conv1d(padded: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv1d(padded, weight, bias, groups=channels)`` (valid, stride 1), with the
    backward above: ``padded`` `(batch, channels, length + width - 1)`, ``weight`` `(channels,
    1, width)`, ``bias`` `(channels,)` or None -> `(batch, channels, length)`."""
    return _DepthwiseConv1d.apply(padded, weight, bias)
