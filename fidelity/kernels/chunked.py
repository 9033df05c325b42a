"""Chunked selective scan in pure PyTorch: few Python steps, safe exponentials, autograd.

Time is cut into chunks. Inside a chunk starting at step ``t0`` the recurrence
``h_t = exp(a_t) h_{t-1} + x_t`` (``a_t = delta'_t * A``, ``x_t = delta'_t B_t u_t``) is
solved in closed form with cumulative log-decays::

    S_t = a_t0 + ... + a_t                 (decay from the carried state to step t)
    P_t = S_t - a_t0                       (decay from step t0 to step t)
    h_t = exp(S_t) h_carry + exp(Q_t) * cumsum_s(exp(-Q_s) x_s),    Q_t = P_t - c

so one chunk costs a handful of vectorised ops over ``(batch, chunk, d_inner, d_state)``
and the state is carried to the next chunk. ``exp(S_t)`` only decays (or grows exactly as
the true recurrence does). The factorised pair ``exp(Q_t) exp(-Q_s)`` would overflow for
strongly decaying rows, so (1) ``c`` centres each row's ``P`` on its range and (2) chunk
ends are chosen from the data: a chunk stops before the largest per-step ``|a|`` summed
over the chunk exceeds a budget (``2 * 30`` in float32, ``2 * 300`` in float64), which
keeps every exponent within ``[-30, 30]`` (``[-300, 300]``). A chunk of one step needs no
factorisation at all, so any decay strength is handled, only with more (shorter) chunks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fidelity.kernels.reference import (
    apply_skip_and_gate,
    compute_dtype,
    effective_delta,
    start_state,
)

__all__ = ["DEFAULT_MAX_CHUNK", "chunk_bounds", "selective_scan_chunked"]

DEFAULT_MAX_CHUNK = 128
"""Longest chunk: long enough that Python overhead is small, short enough to stay in cache."""

_EXPONENT_LIMIT = {torch.float32: 30.0, torch.float64: 300.0}
"""Largest |exponent| used in a factorised pair: exp(30) ~ 1e13 leaves float32 ample room
for the summed inputs; exp(300) ~ 2e130 does the same for float64."""


def chunk_bounds(step_decay: Tensor, budget: float, max_chunk: int) -> list[tuple[int, int]]:
    """Cut ``length`` steps into chunks ``[start, end)``.

    ``step_decay`` ``(length,)`` is the largest ``|delta' * A|`` of each step over all rows.
    A chunk takes at most ``max_chunk`` steps and its steps after the first (whose decay
    only touches the carried state) sum to at most ``budget``; a single step always fits.
    """
    decay = np.nan_to_num(step_decay.detach().double().cpu().numpy(), nan=np.inf)
    length = decay.shape[0]
    bounds = []
    start = 0
    while start < length:
        following = np.cumsum(decay[start + 1 : start + max_chunk])
        end = start + 1 + int(np.searchsorted(following, budget, side="right"))
        bounds.append((start, end))
        start = end
    return bounds


def selective_scan_chunked(
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
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan over time chunks (inputs as validated by ``selective_scan``).

    Same shapes and results as :func:`fidelity.kernels.reference.selective_scan_ref`:
    ``u``, ``delta``, ``z`` ``(batch, d_inner, length)``; ``A`` ``(d_inner, d_state)``;
    ``B``, ``C`` ``(batch, d_state, length)`` or ``(d_inner, d_state)``; ``D``,
    ``delta_bias`` ``(d_inner,)``; ``initial_state`` ``(batch, d_inner, d_state)``.
    Returns ``out`` ``(batch, d_inner, length)`` in ``u``'s dtype (and the last state in the
    compute dtype). Differentiable through autograd; memory for gradients grows like
    ``batch * d_inner * length * d_state``.
    """
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be a positive number of steps, got {max_chunk}")
    dtype = compute_dtype(u.dtype)
    u_c = u.to(dtype)
    step = effective_delta(delta.to(dtype), delta_bias, delta_softplus)  # (batch, d_inner, L)
    # Time-major layout: a chunk is then a contiguous slice (batch, T, d_inner).
    step_tm = step.transpose(1, 2).contiguous()  # (batch, L, d_inner)
    drive_tm = (step * u_c).transpose(1, 2).contiguous()  # (batch, L, d_inner)
    A_c = A.to(dtype)  # (d_inner, d_state)
    B_tm, C_tm = _time_major(B.to(dtype)), _time_major(C.to(dtype))
    h = start_state(initial_state, u, A.shape[1])  # (batch, d_inner, d_state)

    with torch.no_grad():
        row_rate = A_c.abs().amax(dim=1)  # (d_inner,)
        step_decay = (step_tm.abs() * row_rate).amax(dim=(0, 2))  # (L,)
    bounds = chunk_bounds(step_decay, 2.0 * _EXPONENT_LIMIT[dtype], max_chunk)

    outputs = []
    for start, end in bounds:
        log_decay = step_tm[:, start:end, :, None] * A_c  # (batch, T, d_inner, d_state)
        from_carry = log_decay.cumsum(dim=1)  # S_t
        within = from_carry - from_carry[:, :1]  # P_t, 0 at the chunk's first step
        # The result does not depend on the centre, so it is a constant for autograd.
        centre = 0.5 * (within.amax(dim=1, keepdim=True) + within.amin(dim=1, keepdim=True))
        centred = within - centre.detach()  # Q_t, |Q_t| <= exponent limit
        B_c, C_c = _chunk(B_tm, start, end), _chunk(C_tm, start, end)
        drive = drive_tm[:, start:end, :, None] * B_c  # (batch, T, d_inner, d_state)
        summed = torch.cumsum(torch.exp(-centred) * drive, dim=1)
        states = torch.exp(centred) * summed + torch.exp(from_carry) * h[:, None]
        outputs.append((states * C_c).sum(-1))  # (batch, T, d_inner)
        h = states[:, -1]  # (batch, d_inner, d_state)
    y = torch.cat(outputs, dim=1).transpose(1, 2).contiguous()  # (batch, d_inner, L)
    out = apply_skip_and_gate(y, u_c, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


def _time_major(BC: Tensor) -> Tensor:
    """``(batch, d_state, L)`` -> ``(batch, L, 1, d_state)`` view; time-invariant
    ``(d_inner, d_state)`` is kept (it broadcasts against ``(batch, T, d_inner, d_state)``)."""
    return BC.transpose(1, 2)[:, :, None, :] if BC.dim() == 3 else BC


def _chunk(BC_tm: Tensor, start: int, end: int) -> Tensor:
    """Steps ``[start, end)`` of a :func:`_time_major` tensor: ``(batch, T, 1, d_state)``."""
    return BC_tm[:, start:end] if BC_tm.dim() == 4 else BC_tm
