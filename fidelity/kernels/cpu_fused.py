"""Fused CPU selective scan: a C++ loop (forward and backward), JIT-compiled on first use.

The whole scan (``delta_bias``, softplus, the recurrence, ``D * u`` and the ``silu(z)`` gate)
runs in ``csrc/selective_scan_cpu.cpp`` on ATen's OpenMP pool. The forward walks groups of
16 (float32) or 8 (float64) channels together, one vector lane per channel, and so does the
backward (the sums over channels that time-varying B and C need are horizontal sums of the
lanes). The forward keeps the state every ``checkpoint_every`` steps (not all ``length``
states) and the backward recomputes each block of states from its checkpoint while walking
time in reverse, giving gradients for every input including ``initial_state``. The backward
writes its gradient rows with non-temporal stores when they are 64-byte aligned. (Advising
transparent huge pages for the large outputs was tried and left out: with THP defrag in
"madvise" mode a fault may compact memory, and when memory was short the backward ran up to
twice as slow.)

Compilation happens on the first call of :func:`load_extension`, never at import. It runs
``torch.utils.cpp_extension.load`` (ninja) with ``-O3 -march=native -fopenmp`` into
``$XDG_CACHE_HOME/memory-fidelity/<torch, python, cpu>/`` (``~/.cache`` when unset), so later
processes reuse the build; a real compile (nothing built yet) says so in one line on
stderr. ``cpp_extension`` serialises concurrent builds of one directory with a lock file; a
lock left by a killed build (older than 15 minutes) is removed with a warning. A failed
compile is warned about once per process and remembered, and callers fall back to the
chunked PyTorch scan.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fidelity.kernels.reference import compute_dtype, start_state

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "build_directory",
    "extension_error",
    "load_extension",
    "selective_scan_cpu",
]

DEFAULT_CHECKPOINT_EVERY = 64
"""Steps between saved states: backward memory is ``length / 64`` states per row and the
per-thread recompute tiles (states and decays, 64 x d_state x 16 channels each) stay in L2."""

_SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan_cpu.cpp"
_EXTENSION_NAME = "fidelity_selective_scan_cpu"
_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_LINK_FLAGS = ["-fopenmp"]
_STALE_LOCK_SECONDS = 15 * 60
EXPECTED_COMPILE_SECONDS = 35  # measured on a 2-core x86_64 machine


@dataclass
class _BuildState:
    """Outcome of this process's single compile attempt."""

    attempted: bool = False
    module: ModuleType | None = None
    error: str | None = None


_build = _BuildState()
_build_lock = threading.Lock()


def build_directory() -> Path:
    """Where the extension is built: keyed by torch and Python version, by the CPU, because
    ``-march=native`` code may not run on another processor, and by where the source lies:
    ``cpp_extension`` rebuilds when the build file names another source path, so two
    checkouts sharing one directory rebuilt it (about 35 s) every time the other had run, and
    waited on each other's build lock."""
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cpu = hashlib.sha1(
        f"{platform.machine()} {_cpu_description()} {_COMPILE_FLAGS} {_SOURCE}".encode()
    ).hexdigest()[:12]
    python = f"py{platform.python_version_tuple()[0]}{platform.python_version_tuple()[1]}"
    torch_version = torch.__version__.replace("+", "-")
    return Path(cache_root) / "memory-fidelity" / f"torch-{torch_version}-{python}-{cpu}"


def _cpu_description() -> str:
    """The CPU model and feature flags (Linux), or the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _remove_stale_lock(directory: Path) -> None:
    """Delete a build lock left behind by a killed compile (cpp_extension would wait forever)."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_SECONDS:
        warnings.warn(
            f"removing a stale build lock {lock} ({age / 60:.0f} minutes old)",
            RuntimeWarning,
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)


def _compile_extension() -> ModuleType:
    """Compile (or reuse the cached build of) the C++ kernel and import it."""
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory)
    if not any(directory.glob(f"{_EXTENSION_NAME}.*")):  # no built module: a real compile
        print(
            f"fidelity: compiling the fused CPU selective scan, once per machine (about "
            f"{EXPECTED_COMPILE_SECONDS} s; cached in {directory})",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=_EXTENSION_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=_COMPILE_FLAGS,
        extra_ldflags=_LINK_FLAGS,
        build_directory=str(directory),
        verbose=False,
    )


def load_extension() -> ModuleType | None:
    """The compiled kernel module, compiling it on the first call of the process.

    Returns ``None`` when compilation failed; the failure is warned about once (a
    ``RuntimeWarning``) and :func:`extension_error` says why.
    """
    with _build_lock:
        if not _build.attempted:
            _build.attempted = True
            try:
                _build.module = _compile_extension()
            except Exception as exc:  # a compiler, linker or import failure: all mean "no kernel"
                _build.error = f"{type(exc).__name__}: {_summary(str(exc))}"
                warnings.warn(
                    "fidelity: the fused CPU selective scan could not be compiled "
                    f"({_build.error}); using the chunked PyTorch scan instead (slower).",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _build.module


def extension_error() -> str | None:
    """Why the kernel is unavailable (``None`` if it compiled or was not attempted yet)."""
    return _build.error


def _summary(text: str, limit: int = 600) -> str:
    """The compiler's error lines (or the first lines) of a build failure, at most ``limit``
    characters: enough to say why without pasting a whole build log into a warning."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    joined = " | ".join(errors[:4] or lines[:4])
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class _FusedScan(torch.autograd.Function):
    """The whole scan in C++, both directions.

    Inputs (contiguous, one dtype: float32 or float64): ``u``, ``delta``, ``z``
    ``(batch, d_inner, length)``; ``A`` ``(d_inner, d_state)``; ``B``, ``C``
    ``(batch, length, d_state)`` or ``(d_inner, d_state)``; ``D``, ``delta_bias``
    ``(d_inner,)``; ``h0`` ``(batch, d_inner, d_state)``. ``D``, ``z``, ``delta_bias`` may be
    ``None``. Returns ``(out, h_last)``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, every):  # type: ignore[override]
        kernel = _require_extension()
        keep = any(ctx.needs_input_grad[:9])
        out, h_last, checkpoints = kernel.forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, keep, every
        )
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, checkpoints)
            ctx.delta_softplus = delta_softplus
            ctx.every = every
        return out, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h_last):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, h0, checkpoints = ctx.saved_tensors
        grads = _require_extension().backward(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            ctx.delta_softplus,
            h0,
            checkpoints,
            ctx.every,
            grad_out.contiguous(),
            grad_h_last.contiguous(),
        )
        wanted = [
            g if need else None for g, need in zip(grads, ctx.needs_input_grad[:9], strict=True)
        ]
        return (*wanted, None, None)


def _require_extension() -> ModuleType:
    kernel = load_extension()
    if kernel is None:
        raise RuntimeError(f"the fused CPU selective scan is unavailable: {_build.error}")
    return kernel


def selective_scan_cpu(
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
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the fused C++ kernel (CPU tensors as validated by ``selective_scan``).

    Same shapes and results as :func:`fidelity.kernels.reference.selective_scan_ref`:
    ``u``, ``delta``, ``z`` ``(batch, d_inner, length)``; ``A`` ``(d_inner, d_state)``;
    ``B``, ``C`` ``(batch, d_state, length)`` or ``(d_inner, d_state)``; ``D``,
    ``delta_bias`` ``(d_inner,)``; ``initial_state`` ``(batch, d_inner, d_state)``.
    Returns ``out`` ``(batch, d_inner, length)`` in ``u``'s dtype (and the last state in the
    compute dtype). Gradients flow to every tensor argument. Raises ``RuntimeError`` when the
    kernel could not be compiled.
    """
    if checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every must be a positive number of steps, got {checkpoint_every}"
        )
    dtype = compute_dtype(u.dtype)
    h0 = start_state(initial_state, u, A.shape[1]).contiguous()  # (batch, d_inner, d_state)
    out, h_last = _FusedScan.apply(
        u.to(dtype).contiguous(),
        delta.to(dtype).contiguous(),
        A.to(dtype).contiguous(),
        _kernel_layout(B.to(dtype)),
        _kernel_layout(C.to(dtype)),
        _optional(D, dtype),
        _optional(z, dtype),
        _optional(delta_bias, dtype),
        h0,
        bool(delta_softplus),
        checkpoint_every,
    )
    out = out.to(u.dtype)
    return (out, h_last) if return_last_state else out


def _optional(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype).contiguous()


def _kernel_layout(BC: Tensor) -> Tensor:
    """``(batch, d_state, length)`` -> contiguous ``(batch, length, d_state)`` so each step's
    states are adjacent; time-invariant ``(d_inner, d_state)`` is kept."""
    return BC.transpose(1, 2).contiguous() if BC.dim() == 3 else BC.contiguous()
