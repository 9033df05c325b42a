"""Compare the fused CPU scan at a git revision with the working tree's, in one process.

Compiles ``fidelity/kernels/csrc/selective_scan_cpu.cpp`` as it was at ``--rev`` beside the
current build, then alternates the two (best of ``--repeats``) on the bench_scan inputs
(batch 1, d_inner 1536, d_state 16, float32, input-dependent B/C, D, z, delta_bias,
softplus). Per kernel: the forward alone (no gradients), and forward + backward through
``selective_scan`` (autograd, gradients of every input, output gradient of ones, made once
per length outside the timed runs: the scan's backward receives it, it is no part of its
work). Times are
CPU time with one thread by default (less sensitive to other processes on the cores than
wall time); the load average is printed. Also checks that the two kernels' gradients agree.

    python benchmarks/bench_scan_ab.py --rev main --lengths 8k
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity.bench import scan_inputs, source_at
from fidelity.kernels import cpu_fused, selective_scan
from fidelity.lengths import format_length, parse_length

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "fidelity/kernels/csrc/selective_scan_cpu.cpp"


def build_revision(rev: str):
    """The kernel source at ``rev``, compiled into a scratch build directory."""
    from torch.utils.cpp_extension import load

    commit, source = source_at(ROOT, rev, SOURCE)
    directory = cpu_fused.build_directory().parent / f"ab-{commit}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "selective_scan_cpu.cpp"
    path.write_text(source)
    module = load(
        name=f"fidelity_scan_{commit}",
        sources=[str(path)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )
    return commit, module


def forward(inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return selective_scan(**inputs, delta_softplus=True, backend="cpu")


def forward_backward(leaves: dict, grad_out: torch.Tensor) -> list[torch.Tensor]:
    for tensor in leaves.values():
        tensor.grad = None
    out = selective_scan(**leaves, delta_softplus=True, backend="cpu")
    out.backward(grad_out)
    return [tensor.grad for tensor in leaves.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="git revision of the 'before' kernel")
    parser.add_argument("--lengths", default="8k", help="comma list")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall or args.threads > 1 else time.process_time
    current = cpu_fused.load_extension()
    if current is None:
        parser.error(f"the fused CPU kernel did not compile: {cpu_fused.extension_error()}")
    commit, before = build_revision(args.rev)
    kernels = {f"before ({commit})": before, "after (worktree)": current}
    print(
        f"load average {os.getloadavg()[0]:.1f} at the start; {args.threads} thread(s); "
        f"{'wall' if clock is time.perf_counter else 'CPU'} time, best of {args.repeats}"
    )
    print("| length | kernel | fwd | fwd+bwd | ratio |")
    print("|---|---|---|---|---|")
    for length in [parse_length(text) for text in args.lengths.split(",")]:
        inputs = scan_inputs(length)
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
        grad_out = torch.ones_like(inputs["u"])
        best = {(name, what): float("inf") for name in kernels for what in ("fwd", "fwd+bwd")}
        grads = {}
        for _ in range(args.repeats):
            for name, module in kernels.items():
                cpu_fused._build.module = module  # the wrapper calls whichever is loaded
                start = clock()
                forward(inputs)
                best[name, "fwd"] = min(best[name, "fwd"], clock() - start)
                start = clock()
                grads[name] = forward_backward(leaves, grad_out)
                best[name, "fwd+bwd"] = min(best[name, "fwd+bwd"], clock() - start)
        cpu_fused._build.module = current
        first, second = grads.values()
        error = max(
            ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(first, second, strict=True)
        )
        for name in kernels:
            fwd, both = best[name, "fwd"], best[name, "fwd+bwd"]
            print(
                f"| {format_length(length)} | {name} | {fwd:.3f} s | {both:.3f} s | "
                f"{both / fwd:.2f}x |"
            )
        print(f"gradients of the two kernels agree to {error:.1e} of their largest magnitude")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
