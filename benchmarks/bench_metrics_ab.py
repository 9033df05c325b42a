"""ETMF and ECLMF compute against an earlier revision of the metric modules, in one process.

Captures one forward pass of ``--model`` at ``--length`` (default analysis plan: anchors,
distances, layers), then times ``etmf_per_anchor``, ``etmf_frame``, ``etmf_summary`` and
``eclmf`` of the working tree and of ``--baseline`` (those modules as committed there, loaded
from ``git show``), alternating, best of ``--repeats``; prints seconds, ratios and the load.
Reproduce:

    python benchmarks/bench_metrics_ab.py --model memmamba --length 60k --baseline 0a33147
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fidelity
from fidelity.analysis import CENTERED, AnalysisOptions, _input_embedding, plan_run
from fidelity.probes.capture import capture
from fidelity.probes.tasks import make_probe

MODULES = ("readout", "toolkit", "curves", "etmf", "eclmf")
PHASES = ("etmf_per_anchor", "etmf_frame", "etmf_summary", "eclmf")


def baseline_package(revision: str, directory: Path) -> str:
    """Write the metric modules of ``revision`` as package ``baseline_metrics`` under
    ``directory`` (imports among them redirected) and return the package name."""
    package = directory / "baseline_metrics"
    package.mkdir()
    (package / "__init__.py").write_text("")
    pattern = re.compile(r"from fidelity\.metrics\.(" + "|".join(MODULES) + r") import")
    for name in MODULES:
        source = subprocess.run(
            ["git", "show", f"{revision}:fidelity/metrics/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (package / f"{name}.py").write_text(pattern.sub(r"from baseline_metrics.\1 import", source))
    return "baseline_metrics"


def run_phases(package: str, cap, plan, embedding) -> dict[str, float]:
    """Wall seconds of each phase with the modules of ``package``."""
    etmf = importlib.import_module(f"{package}.etmf")
    eclmf = importlib.import_module(f"{package}.eclmf")
    seconds = {}
    started = time.perf_counter()
    per_anchor = etmf.etmf_per_anchor(
        cap, plan.anchors, plan.distances, plan.layers, embedding, seed=0, centered=CENTERED
    )
    seconds["etmf_per_anchor"] = time.perf_counter() - started
    started = time.perf_counter()
    etmf.etmf_frame(per_anchor, n_boot=200, seed=0)
    seconds["etmf_frame"] = time.perf_counter() - started
    started = time.perf_counter()
    etmf.etmf_summary(per_anchor, n_boot=200, seed=0)
    seconds["etmf_summary"] = time.perf_counter() - started
    started = time.perf_counter()
    eclmf.eclmf(cap, plan.anchors, n_boot=200, seed=0, centered=CENTERED)
    seconds["eclmf"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="memmamba")
    parser.add_argument("--length", default="60k")
    parser.add_argument("--baseline", default="0a33147")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = fidelity.load_model(args.model).eval()
    plan = plan_run(model, AnalysisOptions(args.length), time_it=False)
    probe = make_probe("text", plan.length, batch=1, seed=0)
    cap = capture(
        model,
        probe.input_ids,
        layers=plan.layers,
        positions=plan.positions,
        dtype=plan.store_dtype,
        chunk_size=plan.chunk_size,
    )
    embedding = _input_embedding(model)
    print(
        f"{args.model} {args.length}: {plan.anchors.numel()} anchors, {plan.distances.numel()} "
        f"distances, layers {plan.layers}; {args.threads} torch thread(s)"
    )
    print(f"load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as directory:
        sys.path.insert(0, directory)
        packages = {
            "baseline": baseline_package(args.baseline, Path(directory)),
            "current": "fidelity.metrics",
        }
        best = {name: dict.fromkeys(PHASES, float("inf")) for name in packages}
        for _ in range(args.repeats):
            for name, package in packages.items():
                for phase, seconds in run_phases(package, cap, plan, embedding).items():
                    best[name][phase] = min(best[name][phase], seconds)
    print(f"load after: {os.getloadavg()}")
    print(f"best of {args.repeats}, wall seconds | baseline {args.baseline} | current | ratio")
    for phase in (*PHASES, "etmf total"):
        if phase == "etmf total":
            old, new = (sum(v for k, v in best[n].items() if k != "eclmf") for n in packages)
        else:
            old, new = best["baseline"][phase], best["current"][phase]
        print(f"{phase:16s} | {old:7.2f} | {new:7.2f} | {old / new:5.2f}x")


if __name__ == "__main__":
    main()
