"""Induction heads, length extrapolation: the Mamba paper's Table 2 (Gu and Dao 2023, sec.
4.1.2) on our trained 2-layer, d_model 64 models.

Each model was trained on induction rows of length 256 (fidelity/data/TRAINING.md); here it
is tested on the paper's form of the task (one earlier trigger, the query at the end; vocab
16) at lengths 2^6 to 2^20. Rows are fed through the model's recurrent cache in chunks, so a
1M-token row needs memory independent of its length for the recurrent models; the
Transformer's KV cache and its attention cost grow with the length, and it is tested up to
``--transformer-max`` only. Test rows come from seeds the training never used (training
batches use seeds below 10^6 for seed 0; tests start at 10^9).

Accuracy: rows whose answer is the argmax, with Wilson 95% intervals; the number of rows
per length shrinks with the length to bound the tokens per length (``--tokens-per-length``).

    python benchmarks/induction.py                        # the shipped models, writes
                                                          # benchmarks/results/induction.md
    python benchmarks/induction.py --model mamba=runs/ind/mamba/ckpt-1000 --max-length 4k

Each model's results are also kept in ``--cache`` (``runs/induction-eval/LABEL.json``), so
models can be evaluated in parallel processes and one last run writes the table from the
cache (a model's cached lengths are reused when its checkpoint and the settings match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

import fidelity
from fidelity.atomic import write_text_atomically
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.task_accuracy import TaskAccuracy, task_accuracy

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED = {
    "mamba": "mamba-induction",
    "memmamba": "memmamba-induction",
    "mamba2": "mamba2-induction",
    "transformer": "transformer-induction",
}
TEST_SEED = 10**9
PAPER = (
    "The paper's Table 2 (Gu and Dao 2023, arXiv 2312.00752; their figures, not ours): "
    "2-layer models trained at length 256 and tested from 2^6 to 2^20 tokens. Mamba keeps "
    "100% accuracy at every test length up to 2^20 (about 1M tokens, 4000x the training "
    "length); the attention variants (absolute, RoPE and xPos positions) fall apart beyond "
    "about 2x the training length (and run out of memory at the longest lengths); H3 and "
    "Hyena degrade as well."
)


def rows_for(length: int, tokens_per_length: int, max_rows: int, min_rows: int) -> int:
    """Rows tested at ``length``: ``tokens_per_length // length`` within [min_rows, max_rows]."""
    return max(min_rows, min(max_rows, tokens_per_length // length))


def power(length: int) -> str:
    """``2^k`` for a power of two, else the length."""
    exponent = length.bit_length() - 1
    return f"2^{exponent}" if length == 2**exponent else str(length)


def cell(result: TaskAccuracy | None) -> str:
    if result is None:
        return "-"
    return (
        f"{100 * result.accuracy:.0f} [{100 * result.low:.0f}, {100 * result.high:.0f}] "
        f"({result.trials})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="label=checkpoint")
    parser.add_argument("--min-length", default="64")
    parser.add_argument("--max-length", default=str(2**20))
    parser.add_argument("--transformer-max", default=str(2**13))
    parser.add_argument("--tokens-per-length", default="128k")
    parser.add_argument("--max-rows", type=int, default=100)
    parser.add_argument("--min-rows", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=RESULTS / "induction.md")
    parser.add_argument("--cache", type=Path, default=Path("runs/induction-eval"))
    args = parser.parse_args()
    models = dict(SHIPPED)
    if args.model:
        models = dict(spec.split("=", 1) for spec in args.model)
    lengths = []
    length = parse_length(args.min_length)
    while length <= parse_length(args.max_length):
        lengths.append(length)
        length *= 2
    budget = parse_length(args.tokens_per_length)
    transformer_max = parse_length(args.transformer_max)
    results: dict[str, dict[int, TaskAccuracy]] = {}
    seconds: dict[str, float] = {}
    described: dict[str, str] = {}
    settings = {
        key: str(getattr(args, key)) for key in ("tokens_per_length", "max_rows", "min_rows")
    }
    args.cache.mkdir(parents=True, exist_ok=True)
    for label, source in models.items():
        cached = args.cache / f"{label}.json"
        results[label], seconds[label] = {}, 0.0
        if cached.is_file():
            saved = json.loads(cached.read_text())
            if saved["source"] == source and all(
                saved["settings"].get(key) == value for key, value in settings.items()
            ):
                results[label] = {r["length"]: TaskAccuracy(**r) for r in saved["results"]}
                seconds[label], described[label] = saved["seconds"], saved["described"]
                print(f"{label}: reusing {len(results[label])} lengths from {cached}")
        model = fidelity.load_model(source)
        is_attention = model.config.model_type == "transformer"
        training = model.provenance.get("training", {})
        described[label] = (
            f"`{source}` ({model.config.model_type}, {model.num_parameters():,} parameters, "
            f"step {training.get('step', '?')}, trained at length {training.get('length', '?')})"
        )
        started = time.perf_counter()
        for length in lengths:
            if is_attention and length > transformer_max:
                break
            if length in results[label]:
                continue
            rows = rows_for(length, budget, args.max_rows, args.min_rows)
            result = task_accuracy(
                model,
                "induction",
                length,
                trials=rows,
                batch=max(1, min(rows, budget // (4 * length), 64)),
                seed=TEST_SEED + length,
                chunk_size=args.chunk_size,
            )
            results[label][length] = result
            print(f"{label:12s} {format_length(length):>6s} {cell(result)}", flush=True)
        seconds[label] += time.perf_counter() - started
        record = {
            "source": source,
            "settings": settings,
            "seconds": seconds[label],
            "described": described[label],
            "results": [dataclasses.asdict(r) for r in results[label].values()],
        }
        cached.write_text(json.dumps(record))
    write_report(args, lengths, results, seconds, described, transformer_max)


def write_report(args, lengths, results, seconds, described, transformer_max) -> None:
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    header = "| model | " + " | ".join(power(length) for length in lengths)
    lines = [
        "# Induction heads: length extrapolation (the Mamba paper's Table 2, reproduced small)",
        "",
        PAPER,
        "",
        "## Ours",
        "",
        "Accuracy in % [Wilson 95% interval] (rows tested), argmax at the last position, on "
        "the paper's form of the task (vocabulary 16, one earlier trigger). Trained at length "
        "256 = 2^8. '-': not tested (the Transformer stops at "
        f"{format_length(transformer_max)} tokens: its attention over the KV cache costs "
        "O(length^2) time, hours per row at 1M on this CPU). Rows per length: "
        f"{args.tokens_per_length} tokens' worth, between {args.min_rows} and {args.max_rows}; "
        f"with {args.min_rows} rows a cell's interval is wide (0 of 2 is [0, 66]): such a cell "
        "says only whether the model is reliably right, not how often.",
        "",
        header + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for label, by_length in results.items():
        cells = [cell(by_length.get(length)) for length in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Chance is 1/15 = {100 / 15:.1f}% (the answer is one of 15 data tokens). Longest test "
        "length at which each model keeps at least 90% accuracy, and its accuracy at the "
        "longest length tested:",
        "",
    ]
    for label, by_length in results.items():
        held = [n for n, r in by_length.items() if r.accuracy >= 0.9]
        longest = max(by_length)
        lines.append(
            f"- {label}: >= 90% up to {power(max(held)) if held else 'no length'}; "
            f"{cell(by_length[longest])} at {power(longest)}"
        )
    lines += ["", "Models:", ""]
    for label, text in described.items():
        lines.append(f"- {label}: {text}, evaluated in {seconds[label]:.0f} s")
    lines += [
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, load average "
        f"{load} at the end (shared machine; the models were evaluated in parallel "
        "processes, so the times are pessimistic). Command: `python benchmarks/induction.py "
        + " ".join(f"--model {spec}" for spec in args.model)
        + f" --max-length {args.max_length} --transformer-max {args.transformer_max} "
        f"--tokens-per-length {args.tokens_per_length} --min-rows {args.min_rows} "
        f"--max-rows {args.max_rows}`.",
    ]
    write_text_atomically(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
