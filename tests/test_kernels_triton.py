"""The Triton backend, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

Triton picks interpreter or compiler when a function is decorated, so ``conftest.py`` sets
the variable before anything imports Triton.

Error bounds as in test_kernels.py: max error <= 1e-10 (float64) / 1e-4 (float32) x max|ref|.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fidelity.kernels import selective_scan

if importlib.util.find_spec("triton") is None:  # pragma: no cover - depends on the install
    pytest.skip("Triton is not installed, so its interpreter cannot run", allow_module_level=True)

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("TRITON_INTERPRET=1 was not set before importing Triton", allow_module_level=True)


def make_inputs(batch, d_inner, d_state, length, dtype, *, seed, varying_B=True, varying_C=True):
    """All options present (D, z, bias, softplus, initial state); A = -exp(N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "u": normal(batch, d_inner, length),
        "delta": normal(batch, d_inner, length) - 1.0,
        "A": -torch.exp(normal(d_inner, d_state)),
        "B": normal(batch, d_state, length) if varying_B else normal(d_inner, d_state),
        "C": normal(batch, d_state, length) if varying_C else normal(d_inner, d_state),
        "D": normal(d_inner),
        "z": normal(batch, d_inner, length),
        "delta_bias": 0.5 * normal(d_inner),
        "delta_softplus": True,
        "initial_state": normal(batch, d_inner, d_state),
    }


def assert_close_to(actual, expected, rel, what):
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x max|ref| {scale:.3g}"


SHAPES = [(1, 1, 1, 1), (2, 7, 3, 7), (1, 33, 16, 65), (2, 64, 5, 63), (1, 4, 16, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_triton_matches_ref(shape, dtype):
    inputs = make_inputs(*shape, dtype, seed=sum(shape))
    out_ref, state_ref = selective_scan(**inputs, return_last_state=True, backend="ref")
    out, state = selective_scan(**inputs, return_last_state=True, backend="triton")
    assert_close_to(out, out_ref, REL_TOL[dtype], "triton out")
    assert_close_to(state, state_ref, REL_TOL[dtype], "triton last_state")


@pytest.mark.parametrize(
    ("varying_B", "varying_C"),
    [(False, False), (True, False), (False, True)],
    ids=["BC-invariant", "B-varying", "C-varying"],
)
def test_triton_time_invariant_B_C(varying_B, varying_C):
    inputs = make_inputs(
        2, 9, 4, 20, torch.float64, seed=5, varying_B=varying_B, varying_C=varying_C
    )
    out_ref = selective_scan(**inputs, backend="ref")
    assert_close_to(selective_scan(**inputs, backend="triton"), out_ref, 1e-10, "triton out")


def test_triton_without_optional_inputs():
    inputs = make_inputs(1, 5, 3, 12, torch.float32, seed=6)
    bare = dict(inputs, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None)
    bare["delta"] = bare["delta"].abs()
    assert_close_to(
        selective_scan(**bare, backend="triton"), selective_scan(**bare, backend="ref"), 1e-4, "out"
    )


def test_triton_gradcheck_through_chunked_recompute():
    inputs = make_inputs(1, 3, 2, 6, torch.float64, seed=7)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    tensors = tuple(inputs[name].requires_grad_() for name in names)

    def f(*args):
        kwargs = dict(zip(names, args, strict=True))
        return selective_scan(
            **kwargs, delta_softplus=True, return_last_state=True, backend="triton"
        )

    assert torch.autograd.gradcheck(f, tensors)
