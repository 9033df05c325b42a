"""Selective scan (Mamba-1) kernels behind one entry point, :func:`selective_scan`.

``selective_scan`` takes mamba_ssm's ``selective_scan_fn`` arguments and shapes, validates
them, and runs one of these backends:

``"ref"``
    plain sequential loop in PyTorch (:mod:`fidelity.kernels.reference`): the oracle.
``"chunked"``
    pure PyTorch, chunked over time with cumulative log-decays
    (:mod:`fidelity.kernels.chunked`); any device, autograd.
``"cpu"``
    fused C++ loop, forward and backward, compiled on first use
    (:mod:`fidelity.kernels.cpu_fused`); CPU tensors.
``"triton"``
    Triton kernel (:mod:`fidelity.kernels.triton_scan`); CUDA tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` was set before Triton was imported. Gradients by recomputing
    through the chunked backend.
``"mamba_ssm"``
    mamba_ssm's CUDA kernel when installed; CUDA tensors, no ``initial_state``.

``backend="auto"`` picks, on CUDA: mamba_ssm if importable and no ``initial_state`` is
given, else triton if importable, else chunked; on CPU: the fused kernel if it compiles (the
compile is tried once per process; a failure is warned about once), else chunked.

Environment variable ``FIDELITY_SCAN_BACKEND``: when set to a backend name, it replaces
``"auto"`` (an explicit ``backend=`` argument still wins). Unknown names raise ``ValueError``.

Nothing is compiled or imported from optional packages when this module is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from fidelity.kernels import cpu_fused
from fidelity.kernels.chunked import selective_scan_chunked
from fidelity.kernels.reference import selective_scan_ref, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_state_update",
]

BACKENDS = ("ref", "chunked", "cpu", "triton", "mamba_ssm")
BACKEND_ENV_VAR = "FIDELITY_SCAN_BACKEND"

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def selective_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan with mamba_ssm's ``selective_scan_fn`` semantics.

    For each batch element, channel ``d`` and state ``n``, with
    ``delta' = softplus(delta + delta_bias)`` (bias and softplus optional)::

        h_t = exp(delta'_t * A[d, n]) * h_{t-1} + delta'_t * B_t[n] * u_t
        y_t = sum_n C_t[n] h_t[n] + D[d] * u_t;   out_t = y_t * silu(z_t) if z is given

    Args:
        u, delta: ``(batch, d_inner, length)``, one dtype (float16, bfloat16, float32, float64).
        A: ``(d_inner, d_state)``, real.
        B, C: input-dependent ``(batch, d_state, length)`` (``u``'s dtype) or time-invariant
            ``(d_inner, d_state)``.
        D, delta_bias: ``(d_inner,)`` or None.
        z: ``(batch, d_inner, length)`` gate (``u``'s dtype) or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state.
        initial_state: ``(batch, d_inner, d_state)`` state before the first step (zeros when
            None); our extension for scanning long sequences in pieces.
        backend: ``"auto"`` or one of :data:`BACKENDS` (see the module docstring).

    Returns:
        ``out`` ``(batch, d_inner, length)`` in ``u``'s dtype, or ``(out, last_state)`` with
        ``last_state`` ``(batch, d_inner, d_state)`` in the compute dtype (float64 for float64
        inputs, float32 otherwise).

    Raises:
        TypeError: a non-tensor argument, a non-floating or complex dtype, a non-bool flag.
        ValueError: wrong shapes, mismatched dtypes or devices, an unknown backend, or a
            backend that cannot run here (the message says why and which can).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_flag("delta_softplus", delta_softplus)
    _check_flag("return_last_state", return_last_state)
    name = resolve_backend(backend, u.device, has_initial_state=initial_state is not None)
    return _implementation(name)(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        initial_state=initial_state,
    )


def selective_state_update(
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
    """One recurrent step of the selective scan; updates ``state`` in place.

    Args:
        state: ``(batch, d_inner, d_state)`` floating tensor, overwritten with the new state.
        x, dt: ``(batch, d_inner)``, one dtype; ``z``: ``(batch, d_inner)`` or None.
        A: ``(d_inner, d_state)``; B, C: ``(batch, d_state)``.
        D, dt_bias: ``(d_inner,)`` or None; dt_softplus: softplus on ``dt + dt_bias``.

    Returns:
        ``y`` ``(batch, d_inner)`` in ``x``'s dtype, equal to the matching step of
        :func:`selective_scan` (computed in float64 for float64 inputs, else float32).
    """
    _check_tensor("state", state)
    if state.dim() != 3:
        raise ValueError(
            f"state must have shape (batch, d_inner, d_state), got {tuple(state.shape)}"
        )
    batch, d_inner, d_state = state.shape
    _check_tensor("x", x, dtypes=_INPUT_DTYPES)
    _check_shape("x", x, (batch, d_inner), "(batch, d_inner)")
    _check_tensor("dt", dt, dtype_like=x)
    _check_shape("dt", dt, (batch, d_inner), "(batch, d_inner)")
    _check_tensor("A", A)
    _check_shape("A", A, (d_inner, d_state), "(d_inner, d_state)")
    for name, tensor in (("B", B), ("C", C)):
        _check_tensor(name, tensor)
        _check_shape(name, tensor, (batch, d_state), "(batch, d_state)")
    for name, tensor in (("D", D), ("dt_bias", dt_bias)):
        if tensor is not None:
            _check_tensor(name, tensor)
            _check_shape(name, tensor, (d_inner,), "(d_inner,)")
    if z is not None:
        _check_tensor("z", z, dtype_like=x)
        _check_shape("z", z, (batch, d_inner), "(batch, d_inner)")
    _check_flag("dt_softplus", dt_softplus)
    _check_same_device(
        state, {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    )
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


# ---------------------------------------------------------------------------------------------
# Backends


def available_backends() -> list[str]:
    """Backends that can run in this process (for some device).

    ``"cpu"`` is listed only if its kernel compiles, so the first call may compile it
    (about a minute, then cached on disk). ``"triton"`` needs Triton and either CUDA or
    ``TRITON_INTERPRET=1``; ``"mamba_ssm"`` needs mamba_ssm and CUDA.
    """
    names = ["ref", "chunked"]
    if cpu_fused.load_extension() is not None:
        names.append("cpu")
    if _triton_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None:
        names.append("triton")
    if torch.cuda.is_available() and _mamba_ssm_error() is None:
        names.append("mamba_ssm")
    return names


def resolve_backend(backend: str, device: torch.device, *, has_initial_state: bool) -> str:
    """The backend :func:`selective_scan` runs for tensors on ``device``.

    ``"auto"`` follows the rule in the module docstring (after ``FIDELITY_SCAN_BACKEND``);
    a named backend is checked and returned. Raises ``ValueError`` for unknown names and for
    backends that cannot run here, saying why and which can.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    source = "backend"
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV_VAR, "").strip()
        if override and override != "auto":
            backend, source = override, f"environment variable {BACKEND_ENV_VAR}"
    if backend == "auto":
        return _auto_backend(device, has_initial_state)
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown scan backend {backend!r} (from {source}); "
            f"choose 'auto' or one of {', '.join(BACKENDS)}"
        )
    reason = _unavailable_reason(backend, device, has_initial_state)
    if reason is not None:
        usable = [
            name
            for name in BACKENDS
            if _unavailable_reason(name, device, has_initial_state, compile_cpu=False) is None
        ]
        raise ValueError(
            f"scan backend {backend!r} (from {source}) cannot run here: {reason}. "
            f"Usable for these inputs: {', '.join(usable)}"
        )
    return backend


def _auto_backend(device: torch.device, has_initial_state: bool) -> str:
    if device.type == "cuda":
        if not has_initial_state and _mamba_ssm_error() is None:
            return "mamba_ssm"
        if _triton_reason(device) is None:
            return "triton"
        return "chunked"
    if device.type == "cpu" and cpu_fused.load_extension() is not None:
        return "cpu"
    return "chunked"


def _unavailable_reason(
    backend: str, device: torch.device, has_initial_state: bool, *, compile_cpu: bool = True
) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None if it can)."""
    if backend in ("ref", "chunked"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors only, the inputs are on {device}"
        if not compile_cpu and cpu_fused.extension_error() is None:
            return None
        if cpu_fused.load_extension() is None:
            return f"its C++ kernel failed to compile ({cpu_fused.extension_error()})"
        return None
    if backend == "triton":
        return _triton_reason(device)
    # mamba_ssm
    if has_initial_state:
        return "mamba_ssm's selective_scan_fn has no initial_state argument"
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, the inputs are on {device}"
    return _mamba_ssm_error()


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before Triton "
        f"is imported), the inputs are on {device}"
    )


@cache
def _mamba_ssm_error() -> str | None:
    """Import mamba_ssm's scan once; None if it works, else why not."""
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as exc:  # ImportError, or a CUDA/ABI error raised while importing
        return f"mamba_ssm cannot be imported ({type(exc).__name__}: {exc})"
    return None


def _implementation(name: str) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    if name == "ref":
        return selective_scan_ref
    if name == "chunked":
        return selective_scan_chunked
    if name == "cpu":
        return cpu_fused.selective_scan_cpu
    if name == "triton":
        from fidelity.kernels.triton_scan import selective_scan_triton

        return selective_scan_triton
    return _selective_scan_mamba_ssm


def _selective_scan_mamba_ssm(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    *,
    initial_state: None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's CUDA kernel, same arguments (resolve_backend has ruled out
    ``initial_state``, which mamba_ssm lacks)."""
    del initial_state
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    _check_tensor("u", u, dtypes=_INPUT_DTYPES)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, d_inner, length), got {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if min(batch, d_inner, length) < 1:
        raise ValueError(f"u must have non-empty (batch, d_inner, length), got {tuple(u.shape)}")
    _check_tensor("delta", delta, dtype_like=u)
    _check_shape("delta", delta, tuple(u.shape), "(batch, d_inner, length) like u")
    _check_tensor("A", A)
    if A.dim() != 2 or A.shape[0] != d_inner or A.shape[1] < 1:
        raise ValueError(
            f"A must have shape (d_inner, d_state) = ({d_inner}, d_state >= 1), "
            f"got {tuple(A.shape)}"
        )
    d_state = A.shape[1]
    for name, tensor in (("B", B), ("C", C)):
        _check_tensor(name, tensor)
        if tensor.dim() == 3:
            _check_tensor(name, tensor, dtype_like=u)
        if tuple(tensor.shape) not in ((batch, d_state, length), (d_inner, d_state)):
            raise ValueError(
                f"{name} must have shape (batch, d_state, length) = ({batch}, {d_state}, "
                f"{length}) for input-dependent {name}, or (d_inner, d_state) = ({d_inner}, "
                f"{d_state}) for time-invariant {name}; got {tuple(tensor.shape)}"
            )
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None:
            _check_tensor(name, tensor)
            _check_shape(name, tensor, (d_inner,), "(d_inner,)")
    if z is not None:
        _check_tensor("z", z, dtype_like=u)
        _check_shape("z", z, tuple(u.shape), "(batch, d_inner, length) like u")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state)
        _check_shape(
            "initial_state", initial_state, (batch, d_inner, d_state), "(batch, d_inner, d_state)"
        )
    _check_same_device(
        u,
        {
            "delta": delta,
            "A": A,
            "B": B,
            "C": C,
            "D": D,
            "z": z,
            "delta_bias": delta_bias,
            "initial_state": initial_state,
        },
    )


def _check_tensor(
    name: str,
    value: object,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    dtype_like: Tensor | None = None,
) -> None:
    """A real floating tensor; with ``dtypes`` one of them, with ``dtype_like`` that dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {value.dtype}")
    if dtypes is not None and value.dtype not in dtypes:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {accepted}; got {value.dtype}")
    if dtype_like is not None and value.dtype != dtype_like.dtype:
        raise ValueError(
            f"{name} must have the same dtype as u/x ({dtype_like.dtype}), got {value.dtype}"
        )


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{name} must have shape {meaning} = {expected}, got {tuple(tensor.shape)}"
        )


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_same_device(reference: Tensor, others: dict[str, Tensor | None]) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"all tensors must be on one device: {name} is on {tensor.device}, "
                f"u/x is on {reference.device}"
            )
