"""Memory metrics against induction accuracy on the shipped induction models (issue 15, item 4).

For each shipped induction model (2 layers, ``d_model`` 64, trained at length 256; see
fidelity/data/TRAINING.md) and test length, this measures

- induction accuracy on the paper's form (one earlier trigger, the query at the end), rows
  from test seeds (10^9 up), Wilson 95% intervals;
- ``fidelity.analyze(model, length, probe="induction", metrics="etmf,ssm_decay,influence")``:
  per layer the ETMF summary (half-life, contiguous length, farthest distance >= 0.5, peak,
  memory mass), influence and SSM decay at the distances nearest 16 and nearest the median
  cue-to-query distance of the test rows (influence stops at 4096, its default reach);
- for MemMamba, the pool trace on the accuracy rows: was the first occurrence's follower (the
  answer's cue) written as a note in each block, and is it still in that block's pool when
  the query is read? Split by rows answered right and wrong.

Writes ``benchmarks/results/induction_metrics.md`` (and ``runs/induction-metrics/raw.json``).

    nice -n 10 python benchmarks/induction_metrics.py
    python benchmarks/induction_metrics.py --lengths 256,1k --models mamba   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch
from induction import SHIPPED, TEST_SEED  # the same models and test rows as the Table 2 run

import fidelity
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.retrieval import wilson_interval
from fidelity.metrics.task_accuracy import answer_hits
from fidelity.probes.memmamba_trace import tracing_memmamba
from fidelity.probes.memory_tasks import make_memory_task

ROOT = Path(__file__).resolve().parent.parent


def rows_for(length: int, tokens: int, low: int, high: int) -> int:
    return max(low, min(high, tokens // length))


def accuracy_and_pool(model, name: str, length: int, rows: int) -> dict:
    """Accuracy on ``rows`` test rows (one batch per 8 rows); MemMamba: the pool trace."""
    solved, distances = [], []
    pool = {"written": {}, "kept": {}}
    for index, start in enumerate(range(0, rows, 8)):
        batch = min(8, rows - start)
        task = make_memory_task("induction", length, batch=batch, seed=TEST_SEED + index)
        cue = task.cue_positions[:, 0]  # the follower of the first trigger
        query = task.answer_positions[:, 0] - 1  # the position whose logits answer
        distances.extend((query - cue).tolist())
        if name == "memmamba":
            with tracing_memmamba(model, tuple(task.input_ids.shape)) as trace:
                hits = answer_hits(model, task)[:, 0]
            for block in trace.logs:
                write_rows, write_positions, _ = trace.writes(block)
                for row in range(batch):
                    mine = write_positions[write_rows == row]
                    written = bool((mine == cue[row]).any())
                    kept = bool((trace.pool_at(block, int(query[row]), row) == cue[row]).any())
                    outcome = "right" if hits[row] else "wrong"
                    for key, value in (("written", written), ("kept", kept)):
                        pool[key].setdefault(block, {}).setdefault(outcome, []).append(value)
        else:
            hits = answer_hits(model, task)[:, 0]
        solved.extend(hits.tolist())
    low, high = wilson_interval(sum(solved), len(solved))
    record = {
        "solved": sum(solved),
        "rows": len(solved),
        "low": low,
        "high": high,
        "median_cue_distance": float(torch.tensor(distances).float().median()),
    }
    if name == "memmamba":
        record["pool"] = pool
    return record


def metric_rows(model, name: str, length: int, anchors: int, cue_distance: float) -> list[dict]:
    """Per layer: ETMF summary, influence and SSM decay near d = 16 and the cue distance."""
    result = fidelity.analyze(
        model,
        length,
        probe="induction",
        metrics="etmf,ssm_decay,influence",
        anchors=anchors,
        progress=False,
        n_boot=100,
    )
    frame = result.frame
    rows = []
    for _, summary in result.summary.iterrows():
        layer = int(summary["layer"])
        if layer == 0:
            continue
        row = {
            "layer": layer,
            **{
                key: float(summary[key])
                for key in (
                    "half_life",
                    "half_life_r2",
                    "contiguous_length",
                    "farthest_distance",
                    "peak_distance",
                    "peak_value",
                    "memory_mass",
                )
            },
        }
        for metric in ("influence", "ssm_decay", "etmf_norm"):
            held = frame[(frame["metric"] == metric) & (frame["layer"] == layer)]
            for tag, target in (("16", 16.0), ("cue", cue_distance)):
                if held.empty:
                    row[f"{metric}@{tag}"] = None
                    continue
                nearest = held.iloc[(held["distance"] - target).abs().argsort().iloc[0]]
                row[f"{metric}@{tag}"] = float(nearest["value"])
                row[f"{metric}@{tag}_d"] = int(nearest["distance"])
        rows.append(row)
    return rows


def fmt(value, spec: str = ".2f") -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def write(args, records: list[dict], seconds: float, load: str | None = None) -> None:
    load = load or " ".join(f"{value:.1f}" for value in os.getloadavg()) + " at the end"
    command = "python benchmarks/induction_metrics.py " + " ".join(
        f"--{key.replace('_', '-')} {value}"
        for key, value in (
            ("models", args.models),
            ("lengths", args.lengths),
            ("tokens", args.tokens),
            ("anchors", args.anchors),
            ("transformer_max", args.transformer_max),
        )
    )
    lines = [
        "# Memory metrics against induction accuracy (shipped induction models)",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min, load average {load}; "
        "shared 2-core CPU, niced). Accuracy: rows whose answer is the argmax, the paper's form "
        "(one earlier trigger, query at the end), test seeds from 10^9, Wilson 95% interval. "
        "Metrics: `fidelity.analyze(model, length, probe='induction', metrics='etmf,ssm_decay,"
        f"influence', anchors={args.anchors})` on one induction row of that length (anchors "
        "are random positions, not the cue). `cue d`: median distance from the cue (the "
        "follower of the first trigger) to the query. Influence and SSM decay are given at the "
        "probed distance nearest 16 and nearest the cue distance (`@cue`, the distance in "
        "brackets; influence is measured up to 4096). Half-life: only where the curve is an "
        "exponential decay (R² >= 0.9), else `-`.",
        "",
        "| model | length | accuracy % [95%] (rows) | cue d | layer | half-life | contiguous "
        "| farthest | peak (ETMF) | mass | ETMF@cue | influence@16 | influence@cue | "
        "SSM decay@16 | SSM decay@cue |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        accuracy = record["accuracy"]
        cell = (
            f"{100 * accuracy['solved'] / accuracy['rows']:.0f} "
            f"[{100 * accuracy['low']:.0f}, {100 * accuracy['high']:.0f}] ({accuracy['rows']})"
        )
        for row in record["layers"]:
            lines.append(
                f"| {record['model']} | {format_length(record['length'])} | {cell} | "
                f"{accuracy['median_cue_distance']:.0f} | {row['layer']} | "
                f"{fmt(row['half_life'])} | {fmt(row['contiguous_length'], '.0f')} | "
                f"{fmt(row['farthest_distance'], '.0f')} | "
                f"{fmt(row['peak_distance'], '.0f')} ({fmt(row['peak_value'])}) | "
                f"{fmt(row['memory_mass'])} | {_at(row, 'etmf_norm', 'cue')} | "
                f"{_at(row, 'influence', '16')} | {_at(row, 'influence', 'cue')} | "
                f"{_at(row, 'ssm_decay', '16', '.2e')} | {_at(row, 'ssm_decay', 'cue', '.2e')} |"
            )
    pools = [r for r in records if "pool" in r["accuracy"]]
    if pools:
        lines += [
            "",
            "## MemMamba's pool: is the cue's follower a note, and still in the pool at the query?",
            "",
            "Per block (0-based), the fraction of test rows whose cue position wrote a note "
            "(`written`) and whose note is still in the block's pool when the query position "
            "reads it (`kept`), over rows answered right / wrong (`-`: no such rows).",
            "",
            "| length | block | written (right) | written (wrong) | kept (right) | kept (wrong) |",
            "|---|---|---|---|---|---|",
        ]
        for record in pools:
            pool = record["accuracy"]["pool"]
            for block in sorted(pool["written"], key=int):
                cells = []
                for key in ("written", "kept"):
                    for outcome in ("right", "wrong"):
                        values = pool[key][block].get(outcome, [])
                        cells.append(f"{sum(values)}/{len(values)}" if values else "-")
                lines.append(
                    f"| {format_length(record['length'])} | {block} | " + " | ".join(cells) + " |"
                )
    lines += ["", "## Reading", "", args.reading.read_text() if args.reading else "(pending)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


def _at(row: dict, metric: str, tag: str, spec: str = ".2f") -> str:
    value = row.get(f"{metric}@{tag}")
    if value is None:
        return "-"
    return f"{format(value, spec)} ({row[f'{metric}@{tag}_d']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mamba,memmamba,mamba2,transformer")
    parser.add_argument("--lengths", default="256,1k,4k,16k,64k")
    parser.add_argument("--tokens", type=int, default=65536, help="test tokens per length")
    parser.add_argument("--anchors", type=int, default=128)
    parser.add_argument("--transformer-max", default="4k")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/induction_metrics.md"
    )
    parser.add_argument("--raw", type=Path, default=ROOT / "runs/induction-metrics/raw.json")
    parser.add_argument("--reading", type=Path, default=None, help="markdown to append")
    parser.add_argument("--from-raw", action="store_true", help="rewrite the table from --raw")
    args = parser.parse_args()
    if args.from_raw:
        saved = json.loads(args.raw.read_text())
        write(args, saved["records"], saved["seconds"], saved.get("load"))
        return
    torch.manual_seed(0)
    started = time.perf_counter()
    records = []
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    models = {name: fidelity.load_model(SHIPPED[name]) for name in args.models.split(",")}
    for length in lengths:  # every model at a length before the next length
        for name, model in models.items():
            if name == "transformer" and length > parse_length(args.transformer_max):
                continue
            rows = rows_for(length, args.tokens, 8, 64)
            accuracy = accuracy_and_pool(model, name, length, rows)
            layers = metric_rows(model, name, length, args.anchors, accuracy["median_cue_distance"])
            records.append(
                {"model": name, "length": length, "accuracy": accuracy, "layers": layers}
            )
            print(
                name,
                format_length(length),
                f"{accuracy['solved']}/{accuracy['rows']}",
                pd.DataFrame(layers)[["layer", "half_life", "farthest_distance", "memory_mass"]]
                .to_string(index=False)
                .replace("\n", " | "),
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            args.raw.write_text(
                json.dumps(
                    {
                        "records": records,
                        "seconds": time.perf_counter() - started,
                        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()) + " at the end",
                    }
                )
            )
    write(args, records, time.perf_counter() - started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
