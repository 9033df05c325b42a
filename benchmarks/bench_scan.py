"""Time selective-scan implementations on CPU, on the same inputs, in one process.

Inputs are Mamba-sized: batch 1, d_inner 1536, d_state 16, float32, input-dependent B and C,
D, z, delta_bias and softplus (A = -(1..16) per channel, Mamba's S4D-real initialisation).
Implementations:

- torch loop: ``fidelity`` backend "ref" (one PyTorch step per token)
- chunked: backend "chunked" (pure PyTorch, chunked over time)
- fused fwd / fused fwd+bwd: backend "cpu" (the C++ kernel), forward alone and forward plus
  backward with respect to every input
- mambapy pscan, HF sequential: ``transformers.models.mamba.modeling_mamba.mamba_selective_scan``
  with ``use_mambapy=True`` (mambapy's Blelloch pscan) and with ``False`` (the sequential loop of
  MambaMixer's slow path); only when transformers (and mambapy) are installed.

Slow implementations stop at the first length where the time extrapolated from the previous
length exceeds ``--budget`` seconds, or where their full-sequence tensors would not fit in
half of the available memory. Every output is compared with the fused forward (max error
relative to its largest magnitude) so a fast but wrong path shows up.

    python benchmarks/bench_scan.py                      # 1k .. 64k
    python benchmarks/bench_scan.py --quick              # 1k, 2k, 4k
    python benchmarks/bench_scan.py --lengths 8k,16k --out benchmarks/results/scan_cpu.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity.bench import scan_inputs
from fidelity.kernels import cpu_fused, selective_scan
from fidelity.lengths import format_length, parse_length

D_INNER, D_STATE = 1536, 16
DEFAULT_LENGTHS = "1k,2k,4k,8k,16k,32k,64k"
QUICK_LENGTHS = "1k,2k,4k"
FAST = "fused fwd"


@dataclass
class Method:
    name: str
    run: Callable[[dict], torch.Tensor]
    full_tensors: int = 0  # (batch, d_inner, length, d_state) float32 tensors it materialises
    stopped: str | None = None  # why longer lengths are skipped
    last: tuple[int, float] | None = None  # (length, seconds) of the last timed run


@dataclass
class Row:
    length: int
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(length: int, seed: int = 0) -> dict:
    return scan_inputs(length, D_INNER, D_STATE, seed)


def ours(backend: str) -> Callable[[dict], torch.Tensor]:
    def run(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return selective_scan(**inputs, delta_softplus=True, backend=backend)

    return run


def fused_forward_backward(inputs: dict) -> torch.Tensor:
    """Forward and backward with respect to every input. The inputs become leaves that need
    gradients, and the output gradient (ones) is made, once per input dict (not per timed
    run: cloning three (1, 1536, length) tensors costs about half a forward, filling a fresh
    one about a seventh), and the leaves' gradients are dropped before each run."""
    if _LEAVES.get("inputs") is not inputs:
        _LEAVES["inputs"] = inputs
        _LEAVES["leaves"] = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
        _LEAVES["grad_out"] = torch.ones_like(inputs["u"])
    leaves = _LEAVES["leaves"]
    for tensor in leaves.values():
        tensor.grad = None
    out = selective_scan(**leaves, delta_softplus=True, backend="cpu")
    out.backward(_LEAVES["grad_out"])
    return out.detach()


_LEAVES: dict = {}  # the inputs dict, the leaves made from it and the output gradient


def hf_scan(use_mambapy: bool) -> Callable[[dict], torch.Tensor]:
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    def run(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return mamba_selective_scan(
                inputs["u"],
                inputs["delta"],
                inputs["A"],
                inputs["B"],
                inputs["C"],
                inputs["D"],
                inputs["z"],
                inputs["delta_bias"],
                delta_softplus=True,
                use_mambapy=use_mambapy,
            )

    return run


def methods() -> list[Method]:
    found = [  # the fused forward first: the others are checked against its output
        Method(FAST, ours("cpu")),
        Method("fused fwd+bwd", fused_forward_backward),
        Method("chunked", ours("chunked")),
        Method("torch loop", ours("ref")),
    ]
    if importlib.util.find_spec("transformers") is not None:
        if importlib.util.find_spec("mambapy") is not None:
            found.append(Method("mambapy pscan", hf_scan(use_mambapy=True), full_tensors=6))
        found.append(Method("HF sequential", hf_scan(use_mambapy=False), full_tensors=3))
    return found


def time_once(method: Method, inputs: dict, repeats: int) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` runs (one run when a run takes over a second)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = method.run(inputs)
        best = min(best, time.perf_counter() - start)
        if best > 1.0:
            break
    return best, out


def time_alternating(
    pair: list[Method], inputs: dict, repeats: int
) -> list[tuple[float, torch.Tensor]]:
    """Best of ``repeats`` rounds, each round running every method of ``pair`` once in turn,
    so that a ratio between them is not skewed by load that changes over the run."""
    best, outs = [float("inf")] * len(pair), [None] * len(pair)
    for _ in range(repeats):
        for index, method in enumerate(pair):
            start = time.perf_counter()
            outs[index] = method.run(inputs)
            best[index] = min(best[index], time.perf_counter() - start)
    return list(zip(best, outs, strict=True))


def skip_reason(method: Method, length: int, budget: float) -> str | None:
    if method.stopped:
        return method.stopped
    if method.full_tensors:
        need = method.full_tensors * D_INNER * length * D_STATE * 4
        if need > 0.5 * psutil.virtual_memory().available:
            return f"needs ~{need / 2**30:.0f} GiB"
    if method.last is not None:
        previous_length, seconds = method.last
        if seconds * length / previous_length > budget:
            return f"> {budget:.0f} s"
    return None


def run_benchmark(lengths: list[int], repeats: int, budget: float, log) -> list[Row]:
    rows = []
    all_methods = methods()
    for length in lengths:
        inputs = make_inputs(length)
        row = Row(length)
        reference = None
        fused = {
            m.name: timed
            for m, timed in zip(
                all_methods[:2], time_alternating(all_methods[:2], inputs, repeats), strict=True
            )
        }
        for method in all_methods:
            reason = skip_reason(method, length, budget)
            if reason is not None:
                method.stopped = reason
                row.notes[method.name] = f"skipped ({reason})"
                continue
            if method.name in fused:  # the fused pair alternates: its ratio is the kernel's
                seconds, out = fused[method.name]
            else:
                seconds, out = time_once(method, inputs, repeats)
            method.last = (length, seconds)
            row.seconds[method.name] = seconds
            if method.name == FAST:
                reference = out
            elif reference is not None:
                error = (out - reference).abs().max() / reference.abs().max()
                row.notes[method.name] = f"err {error.item():.1e}"
            log(f"{format_length(length):>5} {method.name:<14} {seconds:9.4f} s")
        rows.append(row)
    return rows


def render(rows: list[Row], names: list[str], header: str) -> str:
    lines = [header, ""]
    lines.append("| length | " + " | ".join(names) + " | fused fwd tok/s | fused fwd+bwd tok/s |")
    lines.append("|---" * (len(names) + 3) + "|")
    for row in rows:
        fast = row.seconds.get(FAST)
        cells = []
        for name in names:
            if name in row.seconds:
                cell = f"{row.seconds[name]:.3f} s"
                if fast and name != FAST:
                    cell += f" ({row.seconds[name] / fast:.1f}x)"
                if name in row.notes:
                    cell += f" {row.notes[name]}"
            else:
                cell = row.notes.get(name, "")
            cells.append(cell)
        rates = [
            f"{row.length / row.seconds[n]:,.0f}" if n in row.seconds else ""
            for n in (FAST, "fused fwd+bwd")
        ]
        lines.append(f"| {format_length(row.length)} | " + " | ".join(cells + rates) + " |")
    lines.append("")
    lines.append(
        "Cells: best-of time, (ratio to the fused forward), err = max |out - fused| / max |fused|."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=None, help=f"comma list (default {DEFAULT_LENGTHS})")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per slow run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    lengths = [
        parse_length(text)
        for text in (args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)).split(",")
    ]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cpu_fused.load_extension() is None:
        parser.error(f"the fused CPU kernel did not compile: {cpu_fused.extension_error()}")

    load_before = os.getloadavg()[0]
    rows = run_benchmark(lengths, args.repeats, args.budget, log=lambda line: print(line))
    names = [m.name for m in methods()]
    header = (
        f"Selective scan on CPU: batch 1, d_inner {D_INNER}, d_state {D_STATE}, float32, "
        f"input-dependent B/C, D, z, delta_bias, softplus.\n\n"
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other processes share the cores when it "
        f"exceeds the core count). The fused forward and forward+backward alternate, best of "
        f"{args.repeats}; fwd+bwd differentiates every input (leaves and the output gradient "
        f"made once per length).\n"
        f"Command: `python benchmarks/bench_scan.py {' '.join(argv or sys.argv[1:])}`"
    )
    table = render(rows, names, header)
    print()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
