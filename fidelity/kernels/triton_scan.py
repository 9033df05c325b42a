"""Selective scan forward as a Triton kernel (CUDA; CPU under ``TRITON_INTERPRET=1``).

One program owns a block of ``BLOCK_D`` channels of one batch element and keeps their
``(BLOCK_D, d_state)`` states in registers while it walks time; inputs are read time-major
``(batch, length, d_inner)`` so each step's loads are contiguous across channels. The step
sizes (``delta_bias``, softplus), the skip term ``D * u`` and the ``silu(z)`` gate are
PyTorch ops around the kernel.

Gradients: there is no Triton backward kernel. The backward pass recomputes the core scan
with the chunked PyTorch backend (:mod:`fidelity.kernels.chunked`) under autograd and
differentiates that, so training through this backend is correct but costs one chunked
forward and backward (and its memory, about ``batch * d_inner * length * d_state`` values
for the chunk intermediates) on top of the Triton forward.

Importing this module imports Triton; :mod:`fidelity.kernels` imports it only when the
``"triton"`` backend is used. To run on CPU tensors (tests), set ``TRITON_INTERPRET=1``
before Triton is first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fidelity.kernels.chunked import selective_scan_chunked
from fidelity.kernels.reference import (
    apply_skip_and_gate,
    compute_dtype,
    effective_delta,
    start_state,
)

__all__ = ["BLOCK_D", "selective_scan_triton"]

BLOCK_D = 32
"""Channels per program: 32 x d_state states fit in registers for d_state <= 64."""


@triton.jit
def _scan_forward_kernel(
    u_ptr,  # (batch, length, dim) time-major, contiguous
    dt_ptr,  # (batch, length, dim)
    A_ptr,  # (dim, d_state)
    B_ptr,  # strided (stride_B_*: batch, time, dim, state)
    C_ptr,  # strided (stride_C_*)
    h0_ptr,  # (batch, dim, d_state)
    y_ptr,  # (batch, length, dim) out: sum_n C_t[n] h_t[n]
    h_last_ptr,  # (batch, dim, d_state) out
    dim,
    length,
    d_state,
    stride_B_batch,
    stride_B_time,
    stride_B_dim,
    stride_B_state,
    stride_C_batch,
    stride_C_time,
    stride_C_dim,
    stride_C_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < d_state)[None, :]
    # Masked lanes load A = B = h0 = 0, so their states stay 0 and add nothing to y.
    A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask, other=0.0)
    state_offs = (pid_b * dim + offs_d[:, None]) * d_state + offs_n[None, :]
    h = tl.load(h0_ptr + state_offs, mask=mask, other=0.0)
    seq = pid_b * length * dim + offs_d  # element (b, t=0, d) of the time-major inputs
    B_row = B_ptr + pid_b * stride_B_batch + offs_d[:, None] * stride_B_dim
    B_row += offs_n[None, :] * stride_B_state
    C_row = C_ptr + pid_b * stride_C_batch + offs_d[:, None] * stride_C_dim
    C_row += offs_n[None, :] * stride_C_state
    for t in range(length):
        step = tl.load(dt_ptr + seq + t * dim, mask=mask_d, other=0.0)
        drive = step * tl.load(u_ptr + seq + t * dim, mask=mask_d, other=0.0)
        B_t = tl.load(B_row + t * stride_B_time, mask=mask, other=0.0)
        C_t = tl.load(C_row + t * stride_C_time, mask=mask, other=0.0)
        h = tl.exp(step[:, None] * A) * h + drive[:, None] * B_t
        tl.store(y_ptr + seq + t * dim, tl.sum(h * C_t, axis=1), mask=mask_d)
    tl.store(h_last_ptr + state_offs, h, mask=mask)


def _scan_core_forward(u: Tensor, step: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor):
    """Run the kernel: ``u``, ``step`` ``(batch, d_inner, L)``; ``A`` ``(d_inner, d_state)``;
    ``B``, ``C`` ``(batch, d_state, L)`` or ``(d_inner, d_state)``; ``h0``
    ``(batch, d_inner, d_state)``; one dtype. Returns ``y`` ``(batch, d_inner, L)`` (without
    the skip term and gate) and the last state."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    u_tm = u.transpose(1, 2).contiguous()  # (batch, L, d_inner)
    step_tm = step.transpose(1, 2).contiguous()
    B_k, B_strides = _kernel_layout(B)
    C_k, C_strides = _kernel_layout(C)
    y_tm = torch.empty_like(u_tm)
    h_last = torch.empty_like(h0)
    grid = (batch, triton.cdiv(dim, BLOCK_D))
    _scan_forward_kernel[grid](
        u_tm,
        step_tm,
        A.contiguous(),
        B_k,
        C_k,
        h0.contiguous(),
        y_tm,
        h_last,
        dim,
        length,
        d_state,
        *B_strides,
        *C_strides,
        BLOCK_D=BLOCK_D,
        BLOCK_N=triton.next_power_of_2(d_state),
    )
    return y_tm.transpose(1, 2), h_last


def _kernel_layout(BC: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """B or C for the kernel with its (batch, time, dim, state) element strides: an
    input-dependent one becomes contiguous ``(batch, L, d_state)``, a time-invariant one stays
    ``(d_inner, d_state)``."""
    if BC.dim() == 3:
        BC_k = BC.transpose(1, 2).contiguous()  # (batch, L, d_state)
        length, d_state = BC_k.shape[1], BC_k.shape[2]
        return BC_k, (length * d_state, d_state, 0, 1)
    d_state = BC.shape[1]
    return BC.contiguous(), (0, 0, d_state, 1)


class _TritonScan(torch.autograd.Function):
    """Core scan ``(u, step, A, B, C, h0) -> (y, h_last)``: Triton forward, gradients by
    differentiating a chunked-backend recomputation."""

    @staticmethod
    def forward(ctx, u, step, A, B, C, h0):  # type: ignore[override]
        y, h_last = _scan_core_forward(u, step, A, B, C, h0)
        ctx.save_for_backward(u, step, A, B, C, h0)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):  # type: ignore[override]
        saved = [
            t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad, strict=True)
        ]
        with torch.enable_grad():
            u, step, A, B, C, h0 = saved
            y, h_last = selective_scan_chunked(
                u, step, A, B, C, return_last_state=True, initial_state=h0
            )
            wanted = [t for t in saved if t.requires_grad]
            grads = iter(
                torch.autograd.grad((y, h_last), wanted, (grad_y, grad_h_last), allow_unused=True)
            )
        return tuple(next(grads) if t.requires_grad else None for t in saved)


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the Triton kernel (inputs as validated by ``selective_scan``).

    Same shapes and results as :func:`fidelity.kernels.reference.selective_scan_ref`:
    ``u``, ``delta``, ``z`` ``(batch, d_inner, length)``; ``A`` ``(d_inner, d_state)``;
    ``B``, ``C`` ``(batch, d_state, length)`` or ``(d_inner, d_state)``; ``D``,
    ``delta_bias`` ``(d_inner,)``; ``initial_state`` ``(batch, d_inner, d_state)``.
    Returns ``out`` ``(batch, d_inner, length)`` in ``u``'s dtype (and the last state in the
    compute dtype). Differentiable (see the module docstring for how).
    """
    dtype = compute_dtype(u.dtype)
    u_c = u.to(dtype)
    step = effective_delta(delta.to(dtype), delta_bias, delta_softplus)  # (batch, d_inner, L)
    h0 = start_state(initial_state, u, A.shape[1])  # (batch, d_inner, d_state)
    y, h_last = _TritonScan.apply(u_c, step, A.to(dtype), B.to(dtype), C.to(dtype), h0)
    out = apply_skip_and_gate(y, u_c, D, z).to(u.dtype)
    return (out, h_last) if return_last_state else out
