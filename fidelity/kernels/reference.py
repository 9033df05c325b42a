"""Sequential reference selective scan: the oracle every other backend is tested against.

Mamba-1 selective scan with the argument order and shapes of mamba_ssm's
``selective_scan_fn``. For every batch element ``b``, channel ``d`` and state ``n``::

    delta' = softplus(delta + delta_bias)      (bias and softplus optional)
    h_t    = exp(delta'_t * A[d, n]) * h_{t-1} + delta'_t * B_t[n] * u_t
    y_t    = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t  = y_t * silu(z_t)                   (when z is given)

with ``h_{-1} = initial_state`` (zeros by default). The loop below runs one time step per
iteration in plain PyTorch, so it is slow but obviously right, float64-capable and
differentiable through autograd.

The helpers here (:func:`compute_dtype`, :func:`effective_delta`, :func:`apply_skip_and_gate`)
define the shared semantics that the fast backends reuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "apply_skip_and_gate",
    "compute_dtype",
    "effective_delta",
    "selective_scan_ref",
    "selective_state_update_ref",
    "start_state",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the scan is computed in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, *, time_axis: bool = True
) -> Tensor:
    """Step sizes after the optional bias and softplus.

    ``delta`` is ``(batch, d_inner, length)`` (or ``(batch, d_inner)`` with
    ``time_axis=False``); ``delta_bias`` is ``(d_inner,)``. Softplus uses mamba_ssm's rule:
    ``log1p(exp(x))``, and ``x`` itself above 20.
    """
    if delta_bias is not None:
        bias = delta_bias.to(delta.dtype)
        delta = delta + (bias[:, None] if time_axis else bias)
    if delta_softplus:
        delta = F.softplus(delta, beta=1.0, threshold=20.0)
    return delta


def start_state(initial_state: Tensor | None, u: Tensor, d_state: int) -> Tensor:
    """The state before the first step, ``(batch, d_inner, d_state)`` in ``u``'s compute
    dtype: ``initial_state`` converted, or zeros. ``u`` is ``(batch, d_inner, length)``."""
    dtype = compute_dtype(u.dtype)
    if initial_state is None:
        return u.new_zeros(u.shape[0], u.shape[1], d_state, dtype=dtype)
    return initial_state.to(dtype)


def apply_skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip term ``D * u`` and gate by ``silu(z)``.

    ``y``, ``u``, ``z`` are ``(batch, d_inner, length)`` (or ``(batch, d_inner)``) in one
    dtype; ``D`` is ``(d_inner,)``.
    """
    if D is not None:
        skip = D.to(y.dtype)
        y = y + u * (skip[:, None] if y.dim() == 3 else skip)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(
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
    """Selective scan by a plain loop over time (inputs as validated by ``selective_scan``).

    Shapes: ``u``, ``delta``, ``z`` ``(batch, d_inner, length)``; ``A`` ``(d_inner, d_state)``;
    ``B``, ``C`` ``(batch, d_state, length)`` or time-invariant ``(d_inner, d_state)``;
    ``D``, ``delta_bias`` ``(d_inner,)``; ``initial_state`` ``(batch, d_inner, d_state)``.

    Returns ``out`` ``(batch, d_inner, length)`` in ``u``'s dtype, and with
    ``return_last_state`` also the final state ``(batch, d_inner, d_state)`` in the compute
    dtype (float64 for float64 inputs, float32 otherwise).
    """
    dtype = compute_dtype(u.dtype)
    u_c = u.to(dtype)
    step = effective_delta(delta.to(dtype), delta_bias, delta_softplus)  # (batch, d_inner, L)
    # Time-major copies, so each step reads contiguous memory (a (batch, d_inner, L) slice at
    # one t has stride L, which thrashes the cache when L is a power of two).
    step_tm = step.permute(2, 0, 1).contiguous()  # (L, batch, d_inner)
    drive_tm = (step * u_c).permute(2, 0, 1).contiguous()  # (L, batch, d_inner)
    A_c = A.to(dtype)  # (d_inner, d_state)
    B_tm, C_tm = _time_major(B.to(dtype)), _time_major(C.to(dtype))
    h = start_state(initial_state, u, A.shape[1])  # (batch, d_inner, d_state)
    outputs = []
    for t in range(u.shape[2]):  # time steps
        B_t = B_tm[t] if B_tm.dim() == 4 else B_tm  # (batch, 1, d_state) or (d_inner, d_state)
        C_t = C_tm[t] if C_tm.dim() == 4 else C_tm
        h = torch.exp(step_tm[t, :, :, None] * A_c) * h + drive_tm[t, :, :, None] * B_t
        outputs.append((h * C_t).sum(-1))  # (batch, d_inner)
    y = torch.stack(outputs).permute(1, 2, 0).contiguous()  # (L, b, d) -> (batch, d_inner, L)
    out = apply_skip_and_gate(y, u_c, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


def _time_major(BC: Tensor) -> Tensor:
    """``(batch, d_state, L)`` -> ``(L, batch, 1, d_state)``; time-invariant ``(d_inner, d_state)``
    is returned as is."""
    return BC.permute(2, 0, 1).contiguous()[:, :, None, :] if BC.dim() == 3 else BC


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One recurrent step of the scan; updates ``state`` in place.

    Shapes: ``state`` ``(batch, d_inner, d_state)``; ``x``, ``dt``, ``z`` ``(batch, d_inner)``;
    ``A`` ``(d_inner, d_state)``; ``B``, ``C`` ``(batch, d_state)``; ``D``, ``dt_bias``
    ``(d_inner,)``. Returns ``y`` ``(batch, d_inner)`` in ``x``'s dtype. The step is computed
    in float64 for float64 inputs and float32 otherwise, then stored back in ``state``'s dtype.
    """
    dtype = compute_dtype(x.dtype)
    x_c = x.to(dtype)
    step = effective_delta(dt.to(dtype), dt_bias, dt_softplus, time_axis=False)[..., None]
    h = (
        torch.exp(step * A.to(dtype)) * state.to(dtype)
        + (step * x_c[..., None]) * B.to(dtype)[:, None, :]
    )  # (batch, d_inner, d_state)
    state.copy_(h)
    y = (h * C.to(dtype)[:, None, :]).sum(-1)  # (batch, d_inner)
    return apply_skip_and_gate(y, x_c, D, z).to(x.dtype)
