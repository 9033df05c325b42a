"""Compare the Mamba mixer's code at a git revision with the working tree's, in one process.

Loads ``fidelity/models/mamba.py`` as it was at ``--rev`` beside the current module, builds
both mixers with the same config and weights (layer 0 of the shipped ``mamba`` checkpoint by
default), checks that their outputs agree, then alternates them (best of ``--repeats``) on
random block inputs `(batch, length, d_model)`: the forward in one pass, the forward through
the recurrent cache (the analysis feeds chunks this way), and forward + backward (training;
gradients of every parameter and of the input). Times are CPU time of this process with
``--threads`` torch threads (less sensitive to other processes than wall time); the load
average is printed.

    python benchmarks/bench_mixer_ab.py --rev main --lengths 8k
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity.bench import source_at
from fidelity.lengths import format_length, parse_length
from fidelity.models import mamba
from fidelity.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "fidelity/models/mamba.py"


def module_at(rev: str):
    """``fidelity/models/mamba.py`` at ``rev``, imported as a module of its own."""
    commit, source = source_at(ROOT, rev, SOURCE)
    path = Path(tempfile.mkdtemp(prefix="bench-mixer-")) / f"mamba_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return commit, module


def run(mixer: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """One call in ``mode`` (``one pass``, ``cache`` or ``training``); returns the output."""
    if mode == "training":
        x = x.detach().requires_grad_()
        out = mixer(x)
        out.sum().backward()
        return out.detach()
    with torch.no_grad():
        if mode == "cache":
            config, batch = mixer.config, x.shape[0]
            cache = mamba.MambaLayerCache(
                conv=x.new_zeros(batch, config.d_inner, config.d_conv - 1),
                ssm=x.new_zeros(batch, config.d_inner, config.d_state),
            )
            return mixer(x, cache)
        return mixer(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="git revision to compare with")
    parser.add_argument("--lengths", default="8k")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="mamba", help="shipped checkpoint whose layer 0 is used")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit, old = module_at(args.rev)
    current = load_model(args.model).layers[0].mixer.float()
    before = old.MambaMixer(current.config)
    before.load_state_dict(current.state_dict())
    print(
        f"`python benchmarks/bench_mixer_ab.py {' '.join(sys.argv[1:])}`\n\n"
        f"Mamba mixer at {commit} vs the working tree: {args.model} layer 0 (d_model "
        f"{current.config.d_model}, d_inner {current.config.d_inner}), batch {args.batch}, "
        f"float32, {args.threads} torch thread(s), CPU time, best of {args.repeats} alternating; "
        f"load average at the start {os.getloadavg()}.\n"
    )
    print(
        f"| length | mode | {commit} (ms) | current (ms) | current / {commit} | max abs diff "
        "| load |"
    )
    print("|---|---|---|---|---|---|---|")
    for length in (parse_length(v) for v in args.lengths.split(",")):
        x = torch.randn(args.batch, length, current.config.d_model)
        for mode in ("one pass", "cache", "training"):
            difference = (run(before, x, mode) - run(current, x, mode)).abs().max().item()
            best = {"old": float("inf"), "new": float("inf")}
            for _ in range(args.repeats):
                for name, mixer in (("old", before), ("new", current)):
                    start = time.process_time()
                    run(mixer, x, mode)
                    best[name] = min(best[name], time.process_time() - start)
            print(
                f"| {format_length(length)} | {mode} | {best['old'] * 1e3:.1f} | "
                f"{best['new'] * 1e3:.1f} | {best['new'] / best['old']:.2f} | {difference:.1e} | "
                f"{os.getloadavg()[0]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
