"""Induction emerging across training: accuracy and per-layer memory against the step.

For every checkpoint ``RUN/ckpt-<step>`` of each induction run (saved every 5% of the steps,
fidelity/data/TRAINING.md), this measures induction accuracy (the paper's form, Wilson 95%
intervals) at the training length and at 2x and 4x it, and runs ``fidelity.analyze`` on the
induction probe (ETMF: half-life and effective memory length per layer). Writes a markdown
table and a figure (accuracy and last-layer half-life against the step, one line per model).

    python benchmarks/induction_series.py --run mamba=runs/ind/mamba --run mamba2=runs/ind/mamba2

It reads the checkpoints of finished or stopped runs; nothing is trained here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import fidelity
from fidelity.metrics.task_accuracy import task_accuracy
from fidelity.train import checkpoint_dirs

ROOT = Path(__file__).resolve().parent.parent
TEST_SEED = 2 * 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="label=run directory")
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--analyze-length", type=int, default=2048)
    parser.add_argument("--max-step", type=int, default=None, help="ignore later checkpoints")
    parser.add_argument("--every", type=int, default=1, help="use every n-th step multiple")
    parser.add_argument("--anchors", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/induction_series.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/figures/induction-series.png")
    args = parser.parse_args()
    lengths = (256, 512, 1024)
    records = []
    for spec in args.run:
        label, run = spec.split("=", 1)
        for directory in checkpoint_dirs(Path(run)):
            step = int(directory.name.split("-")[1])
            if args.max_step is not None and step > args.max_step:
                continue
            if step % (args.every * (int(checkpoint_dirs(Path(run))[0].name[5:]))) != 0:
                continue
            model = fidelity.load_model(directory)
            row = {"model": label, "step": step}
            for length in lengths:
                result = task_accuracy(
                    model, "induction", length, trials=args.rows, batch=args.rows, seed=TEST_SEED
                )
                row[length] = result
            analysis = fidelity.analyze(
                model,
                args.analyze_length,
                probe="induction",
                metrics="etmf",
                anchors=args.anchors,
                progress=False,
            )
            summary = analysis.summary.set_index("layer")
            last = int(summary.index.max())
            row["half_life"] = float(summary.loc[last, "half_life"])
            row["memory_length"] = float(summary.loc[last, "contiguous_length"])
            records.append(row)
            print(
                label,
                step,
                *(f"{100 * row[n].accuracy:.0f}%" for n in lengths),
                f"half-life {row['half_life']:.2f}",
                flush=True,
            )
    write(args, lengths, records)


def write(args, lengths, records) -> None:
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        "# Induction emerging across training (checkpoints every 5% of the steps)",
        "",
        f"Accuracy in % [Wilson 95%] on {args.rows} test rows of the paper's form at each "
        "length; half-life and effective memory length (tokens) of the last layer from "
        f"`fidelity.analyze(..., probe='induction', metrics='etmf')` at {args.analyze_length} "
        "tokens. Command: `python benchmarks/induction_series.py "
        + " ".join(f"--run {spec}" for spec in args.run)
        + (f" --max-step {args.max_step}" if args.max_step else "")
        + f" --every {args.every} --rows {args.rows} --anchors {args.anchors}"
        + f" --analyze-length {args.analyze_length}"
        + f"`; load average {load} at the end (shared 2-core machine).",
        "",
        "| model | step | "
        + " | ".join(f"acc @ {n}" for n in lengths)
        + " | half-life | memory length |",
        "|---|---|" + "---|" * (len(lengths) + 2),
    ]
    for row in records:
        cells = [
            f"{100 * row[n].accuracy:.0f} [{100 * row[n].low:.0f}, {100 * row[n].high:.0f}]"
            for n in lengths
        ]
        lines.append(
            f"| {row['model']} | {row['step']} | "
            + " | ".join(cells)
            + f" | {row['half_life']:.2f} | {row['memory_length']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label in dict.fromkeys(row["model"] for row in records):
        rows = [row for row in records if row["model"] == label]
        steps = [row["step"] for row in rows]
        left.plot(steps, [row[256].accuracy for row in rows], marker="o", label=label)
        right.plot(steps, [row["half_life"] for row in rows], marker="o", label=label)
    left.set(xlabel="training step", ylabel="induction accuracy at 256", ylim=(0, 1.02))
    right.set(xlabel="training step", ylabel="last-layer ETMF half-life (tokens)")
    left.legend()
    figure.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=110)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
