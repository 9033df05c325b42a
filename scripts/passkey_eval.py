"""Passkey exact match of checkpoints at given lengths, with the standard and held-out text filler.

    python scripts/passkey_eval.py runs/pk-mamba/ckpt-500 memmamba --lengths 1k --trials 10

For each model (a checkpoint directory, a training run directory (its newest checkpoint) or a
shipped name), each length and each filler ("standard": the repeated "grass is green" sentence;
"text": windows of the default corpus's held-out split, text no training row contains), it
scores ``trials`` prompts at each of 5 needle depths (0, .25, .5, .75, 1) by greedy decoding
(:func:`fidelity.metrics.retrieval.teacher_forced_predictions`) and prints the exact-match
rate with a Wilson 95% interval, the rate by depth, and the machine's load. Prompts are a pure
function of ``--seed``, the length and the depth.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from fidelity.lengths import parse_length
from fidelity.metrics.retrieval import DEFAULT_DEPTHS, teacher_forced_predictions, wilson_interval
from fidelity.models.loading import load_model
from fidelity.probes.tasks import FILLERS, passkey_probe
from fidelity.train import checkpoint_dirs


def resolve(model: str) -> str:
    """A run directory becomes its newest checkpoint; anything else is passed through."""
    found = checkpoint_dirs(Path(model)) if Path(model).is_dir() else []
    return str(found[-1]) if found else model


def evaluate(
    model: torch.nn.Module, length: int, filler: str, trials: int, seed: int
) -> tuple[dict, float]:
    """Exact-match hits per depth at ``length`` with ``filler`` (``{depth: (hits, trials)}``)
    and the fraction of answer digits right given the correct earlier ones (teacher forcing)."""
    hits, digits = {}, []
    for index, depth in enumerate(DEFAULT_DEPTHS):
        probe = passkey_probe(
            length, batch=trials, seed=seed * 1000 + index, depth=depth, filler=filler
        )
        answers = torch.tensor(probe.answer_ids)
        predicted = teacher_forced_predictions(model, probe.input_ids, answers, 8192)
        hits[depth] = (int((predicted == answers).all(dim=1).sum()), trials)
        digits.append((predicted == answers)[:, 1:].float().mean().item())  # after the space
    return hits, sum(digits) / len(digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoint dirs, run dirs or shipped names")
    parser.add_argument("--lengths", default="1k", help="comma-separated, e.g. 1k,4k")
    parser.add_argument("--fillers", default=",".join(FILLERS), help="standard,text")
    parser.add_argument("--trials", type=int, default=10, help="prompts per depth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = [parse_length(value) for value in args.lengths.split(",")]
    fillers = args.fillers.split(",")
    print(f"load {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch threads")
    print(
        "| model | length | filler | exact match [Wilson 95%] | by depth 0/.25/.5/.75/1 "
        "| digits right | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(resolve(name)).eval()
        for length in lengths:
            for filler in fillers:
                start = time.perf_counter()
                with torch.no_grad():
                    hits, digit_acc = evaluate(model, length, filler, args.trials, args.seed)
                total = sum(h for h, _ in hits.values())
                n = sum(t for _, t in hits.values())
                low, high = wilson_interval(total, n)
                depths = " / ".join(f"{h / t:.1f}" for h, t in hits.values())
                print(
                    f"| {name} | {length} | {filler} | {total / n:.2f} [{low:.2f}, {high:.2f}] "
                    f"({total}/{n}) | {depths} | {digit_acc:.2f} | "
                    f"{time.perf_counter() - start:.0f}s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
