"""Gradients of the selective-scan backends.

float64: ``torch.autograd.gradcheck`` (finite differences, its default eps 1e-6, atol 1e-5,
rtol 1e-3). float32: every input's gradient within 2e-3 x its largest magnitude of the
float64 reference's gradient on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from fidelity.kernels import selective_scan
from fidelity.kernels.cpu_fused import selective_scan_cpu

TENSOR_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


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
) -> dict[str, torch.Tensor]:
    """Every optional input present, Mamba-like ranges (A = -exp(N(0, 1)), softplus steps)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
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
        "initial_state": normal(batch, d_inner, d_state),
    }


def scan_function(run):
    """f(*tensors) -> (out, last_state) for gradcheck, with softplus on."""

    def f(*tensors):
        kwargs = dict(zip(TENSOR_NAMES, tensors, strict=True))
        initial_state = kwargs.pop("initial_state")
        return run(
            **kwargs, delta_softplus=True, return_last_state=True, initial_state=initial_state
        )

    return f


def by_backend(backend: str):
    def run(**kwargs):
        return selective_scan(**kwargs, backend=backend)

    return run


def cpu_with_blocks(every: int):
    """The fused kernel with a short checkpoint interval, so backward crosses blocks."""

    def run(**kwargs):
        return selective_scan_cpu(**kwargs, checkpoint_every=every)

    return run


GRADCHECK_CASES = {
    "chunked": by_backend("chunked"),
    "cpu": by_backend("cpu"),
    "cpu-every-1": cpu_with_blocks(1),
    "cpu-every-3": cpu_with_blocks(3),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize(
    ("varying_B", "varying_C"),
    [(True, True), (False, False), (True, False)],
    ids=["BC-varying", "BC-invariant", "B-varying-C-invariant"],
)
def test_gradcheck_float64(case, varying_B, varying_C):
    inputs = make_inputs(
        2, 3, 2, 8, torch.float64, seed=1, varying_B=varying_B, varying_C=varying_C
    )
    tensors = tuple(inputs[name].requires_grad_() for name in TENSOR_NAMES)
    assert torch.autograd.gradcheck(scan_function(GRADCHECK_CASES[case]), tensors)


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_float32_gradients_match_float64_reference(backend):
    inputs32 = make_inputs(2, 16, 8, 200, torch.float32, seed=4)
    inputs64 = {name: t.double() for name, t in inputs32.items()}
    grads = {}
    for key, inputs, run_backend in (("fast", inputs32, backend), ("ref", inputs64, "ref")):
        tensors = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        out, state = selective_scan(
            **tensors, delta_softplus=True, return_last_state=True, backend=run_backend
        )
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        ((out * weights).sum() + state.sum()).backward()
        grads[key] = {name: t.grad for name, t in tensors.items()}
    for name in TENSOR_NAMES:
        fast, ref = grads["fast"][name], grads["ref"][name]
        assert fast.dtype == torch.float32
        scale = ref.abs().max().item()
        error = (fast.double() - ref).abs().max().item()
        assert error <= 2e-3 * scale, f"{backend} grad {name}: {error:.3g} > 2e-3 x {scale:.3g}"


def test_cpu_gradient_through_last_state_only():
    """The adjoint can start from the last state alone (out unused)."""
    inputs = make_inputs(1, 4, 3, 20, torch.float64, seed=2)
    grads = {}
    for backend in ("ref", "cpu"):
        tensors = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        _, state = selective_scan(
            **tensors, delta_softplus=True, return_last_state=True, backend=backend
        )
        state.pow(2).sum().backward()
        grads[backend] = tensors
    for name in TENSOR_NAMES:
        # D and z do not reach the state: autograd leaves the reference's grad unset.
        ref = grads["ref"][name].grad
        ref = torch.zeros_like(inputs[name]) if ref is None else ref
        fused = grads["cpu"][name].grad
        assert (fused - ref).abs().max() <= 1e-10 * ref.abs().max(), name


def test_cpu_inference_and_training_paths_agree():
    """Without autograd the kernel skips its checkpoints; the outputs must not change."""
    inputs = make_inputs(1, 4, 3, 50, torch.float64, seed=3)
    with torch.no_grad():
        plain = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    tensors = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    tracked = selective_scan(**tensors, delta_softplus=True, backend="cpu")
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())


@pytest.mark.parametrize(
    ("varying_B", "varying_C"),
    [(True, True), (False, False), (False, True)],
    ids=["BC-varying", "BC-invariant", "B-invariant-C-varying"],
)
@pytest.mark.parametrize(("d_inner", "every"), [(19, 64), (8, 16), (37, 7)])
@pytest.mark.parametrize("seed", [5, 6])
def test_cpu_gradients_match_reference_across_lane_groups(
    varying_B, varying_C, d_inner, every, seed
):
    """The backward walks groups of 8 (float64) channels: more channels than one group, a
    partial last group and several checkpoint blocks, every gradient within 1e-10 of the
    float64 reference's largest magnitude (fresh random inputs per seed)."""
    inputs = make_inputs(
        2, d_inner, 5, 70, torch.float64, seed=seed, varying_B=varying_B, varying_C=varying_C
    )
    grads = {}
    for key, run in (("ref", by_backend("ref")), ("cpu", cpu_with_blocks(every))):
        tensors = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        out, state = scan_function(run)(*(tensors[name] for name in TENSOR_NAMES))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100))
        ((out * weights.double()).sum() + (state * state).sum()).backward()
        grads[key] = {name: t.grad for name, t in tensors.items()}
    for name in TENSOR_NAMES:
        ref, fused = grads["ref"][name], grads["cpu"][name]
        error = (fused - ref).abs().max().item()
        assert error <= 1e-10 * ref.abs().max().item(), f"grad {name}: {error:.3g}"


@pytest.mark.parametrize("softplus", [True, False])
def test_cpu_float32_gradients_across_lane_groups(softplus):
    """float32 (groups of 16 channels), 40 channels, 300 steps: within 2e-3 x the float64
    reference's largest magnitude, with and without softplus."""
    inputs32 = make_inputs(1, 40, 16, 300, torch.float32, seed=9)
    if not softplus:  # positive steps without the softplus
        inputs32["delta"] = inputs32["delta"].abs() * 0.1
        inputs32["delta_bias"] = inputs32["delta_bias"].abs() * 0.1
    grads = {}
    for key, dtype, backend in (("cpu", torch.float32, "cpu"), ("ref", torch.float64, "ref")):
        tensors = {name: t.to(dtype).clone().requires_grad_() for name, t in inputs32.items()}
        out, state = selective_scan(
            **tensors, delta_softplus=softplus, return_last_state=True, backend=backend
        )
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        ((out * weights).sum() + state.sum()).backward()
        grads[key] = {name: t.grad for name, t in tensors.items()}
    for name in TENSOR_NAMES:
        fused, ref = grads["cpu"][name], grads["ref"][name]
        scale = ref.abs().max().item()
        error = (fused.double() - ref).abs().max().item()
        assert error <= 2e-3 * scale, f"grad {name}: {error:.3g} > 2e-3 x {scale:.3g}"


@pytest.mark.parametrize(
    ("varying_B", "varying_C"), [(True, True), (False, False)], ids=["BC-varying", "BC-invariant"]
)
def test_cpu_float32_gradients_streamed_rows_and_sweeps(varying_B, varying_C):
    """float32, 152 channels (9 full groups of 16 and a partial one), 320 steps (a multiple
    of 16, so the gradient rows are written with non-temporal 16 x 16 block stores) on one
    thread: its 10 groups run in three sweeps, each sweep's first group starting the time-
    varying B and C lane sums. Within 2e-3 x the float64 reference's largest magnitude."""
    inputs32 = make_inputs(
        2, 152, 16, 320, torch.float32, seed=11, varying_B=varying_B, varying_C=varying_C
    )
    threads = torch.get_num_threads()
    grads = {}
    try:
        torch.set_num_threads(1)
        for key, dtype, backend in (("cpu", torch.float32, "cpu"), ("ref", torch.float64, "ref")):
            tensors = {name: t.to(dtype).clone().requires_grad_() for name, t in inputs32.items()}
            out, state = selective_scan(
                **tensors, delta_softplus=True, return_last_state=True, backend=backend
            )
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
            ((out * weights.to(dtype)).sum() + state.sum()).backward()
            grads[key] = {name: t.grad for name, t in tensors.items()}
    finally:
        torch.set_num_threads(threads)
    for name in TENSOR_NAMES:
        fused, ref = grads["cpu"][name], grads["ref"][name]
        scale = ref.abs().max().item()
        error = (fused.double() - ref).abs().max().item()
        assert error <= 2e-3 * scale, f"grad {name}: {error:.3g} > 2e-3 x {scale:.3g}"
