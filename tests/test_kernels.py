"""Selective-scan backends against the sequential reference, plus input validation.

Error bounds (max absolute error over the tensor, relative to the reference's largest
magnitude): float64 1e-10, float32 1e-4, float16/bfloat16 inputs 1e-2 (outputs are rounded to
the half type, whose epsilon is 1e-3 / 8e-3).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity.kernels import (
    BACKEND_ENV_VAR,
    cpu_fused,
    resolve_backend,
    selective_scan,
    selective_state_update,
)
from fidelity.kernels.chunked import chunk_bounds, selective_scan_chunked

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FAST_BACKENDS = ["chunked", "cpu"]


def make_inputs(
    batch: int,
    d_inner: int,
    d_state: int,
    length: int,
    dtype: torch.dtype,
    *,
    seed: int,
    varying_B: bool = True,
    varying_C: bool = True,
    with_D: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    softplus: bool = True,
    with_state: bool = True,
) -> dict:
    """Mamba-like random inputs: A = -exp(N(0, 1)), positive step sizes after softplus."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if softplus:
        delta = (torch.randn(batch, d_inner, length, generator=gen, dtype=torch.float64) - 1.0).to(
            dtype
        )
    else:
        delta = (0.01 + 0.5 * torch.rand(batch, d_inner, length, generator=gen)).to(dtype)
    # Without softplus the bias must keep steps positive (negative steps make states grow).
    bias = (
        0.5 * normal(d_inner) if softplus else (0.1 * torch.rand(d_inner, generator=gen)).to(dtype)
    )
    return {
        "u": normal(batch, d_inner, length),
        "delta": delta,
        "A": -torch.exp(normal(d_inner, d_state).double()).to(dtype),
        "B": normal(batch, d_state, length) if varying_B else normal(d_inner, d_state),
        "C": normal(batch, d_state, length) if varying_C else normal(d_inner, d_state),
        "D": normal(d_inner) if with_D else None,
        "z": normal(batch, d_inner, length) if with_z else None,
        "delta_bias": bias if with_bias else None,
        "delta_softplus": softplus,
        "initial_state": normal(batch, d_inner, d_state) if with_state else None,
    }


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected| (and no NaN / inf)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x max|ref| {scale:.3g}"


def check_against_ref(backend: str, inputs: dict, dtype: torch.dtype) -> None:
    out_ref, state_ref = selective_scan(**inputs, return_last_state=True, backend="ref")
    assert torch.isfinite(out_ref).all(), "test inputs must give a finite reference"
    out, state = selective_scan(**inputs, return_last_state=True, backend=backend)
    assert out.dtype == inputs["u"].dtype
    assert_close_to(out, out_ref, REL_TOL[dtype], f"{backend} out")
    assert_close_to(state, state_ref, REL_TOL[dtype], f"{backend} last_state")


# ---------------------------------------------------------------------------------------------
# Agreement with the reference

OPTION_NAMES = ("varying_B", "varying_C", "with_D", "with_z", "with_bias", "softplus", "with_state")
ALL_OPTIONS = list(itertools.product([False, True], repeat=len(OPTION_NAMES)))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "options", ALL_OPTIONS, ids=["".join(str(int(v)) for v in o) for o in ALL_OPTIONS]
)
def test_every_option_combination_matches_ref(backend, dtype, options):
    """All 2^7 combinations of B/C kind, D, z, bias, softplus, initial_state."""
    flags = dict(zip(OPTION_NAMES, options, strict=True))
    inputs = make_inputs(2, 5, 3, 11, dtype, seed=sum(options) * 7 + len(backend), **flags)
    check_against_ref(backend, inputs, dtype)


SHAPES = [  # (batch, d_inner, d_state, length)
    (1, 1, 1, 1),
    (1, 1, 16, 7),
    (3, 64, 16, 63),
    (2, 64, 16, 64),
    (2, 17, 16, 65),
    (1, 8, 4, 300),
    (3, 33, 1, 129),
    (2, 3, 5, 257),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("all_options", [True, False], ids=["all-options", "bare"])
def test_shapes_match_ref(backend, dtype, shape, all_options):
    flags = {name: all_options for name in OPTION_NAMES if name not in ("varying_B", "varying_C")}
    inputs = make_inputs(*shape, dtype, seed=sum(shape), **flags)
    check_against_ref(backend, inputs, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(backend, dtype):
    inputs = make_inputs(2, 16, 8, 100, dtype, seed=3)
    out_ref, state_ref = selective_scan(**inputs, return_last_state=True, backend="ref")
    out, state = selective_scan(**inputs, return_last_state=True, backend=backend)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_close_to(out, out_ref, REL_TOL[dtype], f"{backend} half out")
    assert_close_to(state, state_ref, REL_TOL[torch.float32], f"{backend} half state")


@pytest.mark.parametrize("backend", ["ref", *FAST_BACKENDS])
def test_return_last_state_false_gives_one_tensor(backend):
    inputs = make_inputs(2, 4, 3, 10, torch.float32, seed=0)
    out = selective_scan(**inputs, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 10)


@pytest.mark.parametrize("backend", ["ref", *FAST_BACKENDS])
@pytest.mark.parametrize("cut", [1, 37, 64, 99])
def test_split_with_carried_state_equals_one_pass(backend, cut):
    """Scanning [0, cut) then [cut, L) from the carried state equals one pass (float64, 1e-10)."""
    inputs = make_inputs(2, 6, 4, 100, torch.float64, seed=cut)
    full, full_state = selective_scan(**inputs, return_last_state=True, backend=backend)

    def part(sl: slice, state):
        piece = dict(inputs, initial_state=state)
        for name in ("u", "delta", "z", "B", "C"):
            piece[name] = inputs[name][..., sl]
        return selective_scan(**piece, return_last_state=True, backend=backend)

    first, mid_state = part(slice(0, cut), inputs["initial_state"])
    second, last_state = part(slice(cut, None), mid_state)
    assert_close_to(torch.cat([first, second], dim=-1), full, 1e-10, "split output")
    assert_close_to(last_state, full_state, 1e-10, "split last state")


# ---------------------------------------------------------------------------------------------
# Chunked backend: numerical safety on long sequences


def _decay_inputs(length: int, dtype: torch.dtype, rates: torch.Tensor, step: float) -> dict:
    """Inputs whose per-step log-decay is -step * rates[d] (no softplus, no bias)."""
    inputs = make_inputs(2, rates.numel(), 4, length, dtype, seed=11, softplus=False)
    inputs["delta"] = torch.full_like(inputs["delta"], step)
    inputs["A"] = -rates.to(dtype)[:, None].expand(-1, 4).contiguous()
    return inputs


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "rates",
    [
        torch.full((6,), 80.0),  # exp(-80) per step: strong decay
        torch.full((6,), 1e-7),  # almost no decay: the state sums thousands of inputs
        torch.tensor([1e-7, 1e-3, 0.1, 3.0, 40.0, 500.0]),  # mixed per channel
    ],
    ids=["strong", "near-zero", "mixed"],
)
def test_long_sequences_stay_finite_and_match_ref(backend, dtype, rates):
    inputs = _decay_inputs(2000, dtype, rates, step=1.0)
    check_against_ref(backend, inputs, dtype)


def test_chunked_softplus_above_threshold_matches_ref():
    """delta + bias above 20 takes softplus's identity branch; huge steps decay to zero."""
    inputs = make_inputs(1, 4, 3, 200, torch.float32, seed=5)
    inputs["delta"] = inputs["delta"] * 30.0
    check_against_ref("chunked", inputs, torch.float32)


def test_chunk_bounds_respect_budget_and_cover_the_sequence():
    decay = torch.tensor([5.0, 1.0, 2.0, 3.0, 100.0, 0.5, 0.5, float("inf"), 1.0, 1.0])
    bounds = chunk_bounds(decay, budget=4.0, max_chunk=3)
    assert bounds[0][0] == 0 and bounds[-1][1] == decay.numel()
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    for start, end in bounds:
        assert 1 <= end - start <= 3
        assert decay[start + 1 : end].sum() <= 4.0  # steps after the first fit the budget
    assert bounds == [(0, 3), (3, 4), (4, 7), (7, 10)]  # a first step may decay any amount


def test_chunked_chunk_length_does_not_change_results():
    inputs = make_inputs(2, 5, 3, 90, torch.float64, seed=9)
    one_step = selective_scan_chunked(**inputs, max_chunk=1)
    long = selective_scan_chunked(**inputs, max_chunk=500)
    assert_close_to(long, one_step, 1e-10, "max_chunk 500 vs 1")


# ---------------------------------------------------------------------------------------------
# Property tests over shapes and options


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    d_inner=st.integers(1, 24),
    d_state=st.integers(1, 16),
    length=st.integers(1, 150),
    options=st.tuples(*[st.booleans()] * len(OPTION_NAMES)),
    float64=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_fast_backends_match_ref(batch, d_inner, d_state, length, options, float64, seed):
    dtype = torch.float64 if float64 else torch.float32
    inputs = make_inputs(
        batch,
        d_inner,
        d_state,
        length,
        dtype,
        seed=seed,
        **dict(zip(OPTION_NAMES, options, strict=True)),
    )
    for backend in FAST_BACKENDS:
        check_against_ref(backend, inputs, dtype)


# ---------------------------------------------------------------------------------------------
# One recurrent step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_update_steps_reproduce_the_scan(dtype):
    inputs = make_inputs(2, 6, 4, 20, dtype, seed=2)
    out, last = selective_scan(**inputs, return_last_state=True, backend="ref")
    state = inputs["initial_state"].clone()
    steps = []
    for t in range(20):
        steps.append(
            selective_state_update(
                state,
                inputs["u"][:, :, t],
                inputs["delta"][:, :, t],
                inputs["A"],
                inputs["B"][:, :, t],
                inputs["C"][:, :, t],
                D=inputs["D"],
                z=inputs["z"][:, :, t],
                dt_bias=inputs["delta_bias"],
                dt_softplus=True,
            )
        )
    assert_close_to(torch.stack(steps, dim=-1), out, REL_TOL[dtype], "stepped outputs")
    assert_close_to(state, last, REL_TOL[dtype], "stepped state (updated in place)")


def test_state_update_rejects_bad_shapes():
    state = torch.zeros(2, 6, 4)
    x = torch.zeros(2, 6)
    good = {"A": -torch.ones(6, 4), "B": torch.zeros(2, 4), "C": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match=r"B must have shape \(batch, d_state\)"):
        selective_state_update(state, x, x, **dict(good, B=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"state must have shape"):
        selective_state_update(torch.zeros(2, 6), x, x, **good)
    with pytest.raises(ValueError, match="same dtype"):
        selective_state_update(state, x, x.double(), **good)


# ---------------------------------------------------------------------------------------------
# Validation and backend selection


def _valid(**overrides) -> dict:
    inputs = make_inputs(2, 4, 3, 5, torch.float32, seed=0)
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"u": torch.zeros(2, 4)}, ValueError, r"u must have shape \(batch, d_inner, length\)"),
        ({"u": torch.zeros(2, 4, 0)}, ValueError, "non-empty"),
        ({"delta": torch.zeros(2, 4, 6)}, ValueError, "delta must have shape"),
        ({"A": torch.zeros(5, 3)}, ValueError, r"A must have shape \(d_inner, d_state\)"),
        ({"B": torch.zeros(2, 3, 6)}, ValueError, r"B must have shape \(batch, d_state, length\)"),
        ({"C": torch.zeros(4, 2)}, ValueError, "time-invariant C"),
        ({"D": torch.zeros(3)}, ValueError, r"D must have shape \(d_inner,\)"),
        ({"z": torch.zeros(2, 4, 4)}, ValueError, "z must have shape"),
        ({"delta_bias": torch.zeros(4, 1)}, ValueError, "delta_bias must have shape"),
        ({"initial_state": torch.zeros(2, 4, 4)}, ValueError, "initial_state must have shape"),
        ({"delta": torch.zeros(2, 4, 5, dtype=torch.float64)}, ValueError, "same dtype"),
        ({"B": torch.zeros(2, 3, 5, dtype=torch.float64)}, ValueError, "same dtype"),
        ({"u": torch.zeros(2, 4, 5, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"A": torch.zeros(4, 3, dtype=torch.complex64)}, TypeError, "real floating-point"),
        ({"u": [[0.0]]}, TypeError, "u must be a torch.Tensor"),
        ({"delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
        ({"A": torch.zeros(4, 3, device="meta")}, ValueError, "one device: A is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        selective_scan(**_valid(**overrides), backend="ref")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown scan backend 'fast'.*one of ref, chunked"):
        selective_scan(**_valid(), backend="fast")


def test_mamba_ssm_is_refused_on_cpu_and_with_initial_state():
    with pytest.raises(ValueError, match=r"'mamba_ssm'.*cannot run here.*Usable.*chunked"):
        selective_scan(**_valid(initial_state=None), backend="mamba_ssm")
    with pytest.raises(ValueError, match="no initial_state argument"):
        selective_scan(**_valid(), backend="mamba_ssm")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"'triton'.*cannot run here"):
        selective_scan(**_valid(), backend="triton")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "ref")
    assert resolve_backend("auto", torch.device("cpu"), has_initial_state=False) == "ref"
    # an explicit argument still wins
    assert resolve_backend("chunked", torch.device("cpu"), has_initial_state=False) == "chunked"
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=f"environment variable {BACKEND_ENV_VAR}"):
        selective_scan(**_valid())


def test_auto_on_cpu_picks_the_fused_kernel_when_it_compiles(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    expected = "cpu" if cpu_fused.load_extension() is not None else "chunked"
    assert resolve_backend("auto", torch.device("cpu"), has_initial_state=True) == expected
