"""Forward time of MemMamba against Mamba of the same width and depth (issue: <= 1.5x at 8k).

    python benchmarks/bench_models.py --preset small --length 8k [--repeats 3]

Both models are timed in the same process, alternately, best of ``--repeats``; the ratio is
MemMamba / Mamba. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform

import torch

from fidelity.bench import time_forward
from fidelity.lengths import parse_length
from fidelity.models.registry import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--length", default="8k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="mamba,memmamba")
    args = parser.parse_args()
    length = parse_length(args.length)
    names = args.models.split(",")
    models = {name: build_model(name, args.preset).eval() for name in names}
    times = {name: float("inf") for name in names}
    for _ in range(args.repeats):  # alternate so that background load hits both alike
        for name, model in models.items():
            times[name] = min(times[name], time_forward(model, length, repeats=1))
    base = times[names[0]]
    print(
        f"preset {args.preset}, length {length}, batch 1, float32, {torch.get_num_threads()} "
        f"threads, {platform.processor() or platform.machine()}"
    )
    print("| model | parameters | forward (s) | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        params = models[name].num_parameters()
        print(
            f"| {name} | {params / 1e6:.2f}M | {times[name]:.3f} | {length / times[name]:,.0f} "
            f"| {times[name] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
