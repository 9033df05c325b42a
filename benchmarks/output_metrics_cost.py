"""What the output-level metrics add to an analysis, measured in one run.

1. ``position_loss`` (on by default): the default analysis with and without it, alternating,
   best of ``--repeats``; the ratio is its added cost (it reads the captured pass's logits).
2. ``effrem`` and ``context_probe`` (opt-in): each metric's time over one forward pass of the
   same input (chunked as the analysis feeds it), beside the ratio its stated token count
   predicts (``effrem_tokens / L``, ``context_probe_tokens / L``).

Times are process CPU seconds on one torch thread (steadier than wall time on a shared
machine) and wall seconds; the machine's load is printed before and after. Reproduce:

    python benchmarks/output_metrics_cost.py --model memmamba --length 8k
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import fidelity
from fidelity.analysis import analyze
from fidelity.lengths import parse_length
from fidelity.metrics.context_probe import context_probe, context_probe_tokens
from fidelity.metrics.effrem import effrem, effrem_tokens
from fidelity.metrics.perplexity import sequence_nll
from fidelity.metrics.toolkit import resolve_chunk_size
from fidelity.probes.tasks import make_probe

OLD_DEFAULT = "etmf,eclmf,ssm_decay"


def timed(work) -> tuple[float, float]:
    """``(cpu seconds, wall seconds)`` of ``work()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="memmamba")
    parser.add_argument("--length", default="8k")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    length = parse_length(args.length)
    model = fidelity.load_model(args.model)
    print(f"{args.model}, {args.length}, 1 thread; load before: {os.getloadavg()}")

    runs = {OLD_DEFAULT: [], f"{OLD_DEFAULT},position_loss": []}
    for _ in range(args.repeats):
        for metrics, times in runs.items():
            times.append(timed(lambda m=metrics: analyze(model, length, metrics=m, progress=False)))
    best = {metrics: min(times) for metrics, times in runs.items()}
    (base_cpu, base_wall), (with_cpu, with_wall) = best.values()
    print(
        f"default analysis, best of {args.repeats}: {base_cpu:.1f} s cpu ({base_wall:.1f} s wall)"
        f" without position_loss, {with_cpu:.1f} s cpu ({with_wall:.1f} s wall) with it: "
        f"ratio {with_cpu / base_cpu:.3f} (cpu), {with_wall / base_wall:.3f} (wall)"
    )

    ids = make_probe("text", length, seed=0).input_ids
    chunk = resolve_chunk_size(model, "auto", length)
    forward_cpu, forward_wall = timed(lambda: sequence_nll(model, ids, chunk))
    for name, work, tokens in (
        ("effrem", lambda: effrem(model, ids), effrem_tokens(length)),
        ("context_probe", lambda: context_probe(model, ids), context_probe_tokens(length)),
    ):
        cpu, wall = timed(work)
        print(
            f"{name}: {cpu:.1f} s cpu ({wall:.1f} s wall) = {cpu / forward_cpu:.1f} forwards "
            f"(one forward {forward_cpu:.1f} s cpu, {forward_wall:.1f} s wall); "
            f"stated {tokens / length:.1f} forwards' worth of tokens"
        )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
