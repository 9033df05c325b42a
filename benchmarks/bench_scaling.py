"""Time and peak memory of a forward pass vs sequence length, with the fitted growth exponent.

    python benchmarks/bench_scaling.py                         # mini MemMamba, Mamba, Transformer
    python benchmarks/bench_scaling.py --lengths 1k,4k,16k --models mamba

Each (model, length) runs in a fresh subprocess that feeds the sequence through the model in
chunks of 8192 tokens with its recurrent cache (how `fidelity analyze` runs long inputs; the
Transformer's cache is its full KV cache), and reports the forward time and the growth of its
peak resident memory over the process's baseline. A model stops at the first length whose time
passes `--max-seconds`. The growth exponent is the least-squares slope of log(time) on
log(length) over lengths >= 4k: about 1 for linear-time models, 2 for full attention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

from fidelity.lengths import format_length, parse_length

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = r"""
import json, resource, sys, time, torch
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model, shipped_checkpoint
name, preset, length, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = load_model(name) if preset == "shipped" else build_model(name, preset)
model.eval()
ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids[:, :256])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cache = model.init_cache(1)
    for begin in range(0, length, chunk):
        model(ids[:, begin : begin + chunk], cache=cache)
    seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_growth_bytes": (peak - base) * 1024,
                  "peak_bytes": peak * 1024, "parameters": model.num_parameters()}))
"""


def measure(name: str, preset: str, length: int, chunk: int) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", WORKER, name, preset, str(length), str(chunk)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def growth_exponent(lengths: list[int], seconds: list[float]) -> float:
    points = [
        (math.log(n), math.log(t)) for n, t in zip(lengths, seconds, strict=True) if n >= 4096
    ]
    if len(points) < 2:
        return float("nan")
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="memmamba,mamba,transformer")
    parser.add_argument("--preset", default="shipped", help="'shipped' or a size preset")
    parser.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k,64k,128k,256k,400k")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.md")
    args = parser.parse_args()
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    rows, exponents = [], {}
    for name in args.models.split(","):
        preset = args.preset
        if preset == "shipped":
            from fidelity.models.registry import shipped_checkpoint

            preset = "shipped" if shipped_checkpoint(name) else "mini"
        done_lengths, done_seconds = [], []
        for length in lengths:
            result = measure(name, preset, length, args.chunk)
            done_lengths.append(length)
            done_seconds.append(result["seconds"])
            rows.append((name, preset, length, result))
            print(
                f"{name:12s} {format_length(length):>6s} {result['seconds']:8.2f} s "
                f"{result['peak_growth_bytes'] / 2**20:8.1f} MB",
                flush=True,
            )
            if result["seconds"] > args.max_seconds:
                break
        exponents[name] = growth_exponent(done_lengths, done_seconds)
    lines = [
        "# Forward time and peak memory vs length",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; batch 1, float32, "
        f"chunks of {args.chunk} tokens through each model's cache; load average "
        f"{os.getloadavg()[0]:.1f} at the end (above the core count, other processes shared "
        "the cores and times are pessimistic).",
        "",
        f"Command: `python benchmarks/bench_scaling.py --models {args.models} --preset "
        f"{args.preset} --lengths {args.lengths}`",
        "",
        "| model | weights | length | forward (s) | tokens/s | peak memory growth (MB) "
        "| time / previous length |",
        "|---|---|---|---|---|---|---|",
    ]
    previous = {}
    for name, preset, length, result in rows:
        ratio = ""
        if name in previous:
            last_length, last_seconds = previous[name]
            ratio = f"{result['seconds'] / last_seconds:.2f}x for {length / last_length:g}x tokens"
        previous[name] = (length, result["seconds"])
        lines.append(
            f"| {name} | {preset} | {format_length(length)} | {result['seconds']:.2f} | "
            f"{length / result['seconds']:,.0f} | "
            f"{result['peak_growth_bytes'] / 2**20:.1f} | {ratio} |"
        )
    lines += ["", "Fitted growth exponent of time in length (lengths >= 4k):", ""]
    lines += [f"- {name}: {value:.2f}" for name, value in exponents.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
