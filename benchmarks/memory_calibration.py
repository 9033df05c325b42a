"""Calibrate the memory estimate printed before a run against the measured peak resident memory.

    python benchmarks/memory_calibration.py                     # every shipped model + small
    python benchmarks/memory_calibration.py --models mamba --lengths 8k

Measuring: each (model, length) runs `fidelity.analyze` with its defaults (text probe, 512
anchors, etmf, eclmf, ssm_decay) in a fresh subprocess, which reports its peak resident
memory (`ru_maxrss`); the measurements are appended to `results/memory_calibration.csv`
and reused by later calls (`--remeasure` measures again), since they do not depend on the
estimate. A run whose time estimate passes `--max-seconds` is not run.

Estimating: each row's estimate is made afresh by the current code, in a fresh subprocess
that loads the model and plans the run exactly as `fidelity analyze` does before running it
(what the process holds then plus what the run adds); a refused run says so. The table goes
to `results/memory_calibration.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import date
from pathlib import Path

from fidelity.budget import format_bytes
from fidelity.lengths import format_length, parse_length

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = RESULTS / "memory_calibration.csv"
TABLE = RESULTS / "memory_calibration.md"
TOLERANCE = 0.15
SHIPPED = ("memmamba", "mamba", "mamba2", "transformer", "compressive", "decimamba")
FIELDS = ("model", "weights", "length", "status", "peak", "seconds", "load", "date", "note")

# argv: mode (estimate | measure), model, weights ("shipped" or a preset), length, max seconds.
WORKER = r"""
import json, sys
import psutil
from fidelity.analysis import analyze, peak_memory_bytes, plan_analysis
from fidelity.budget import MemoryBudgetError, estimate_seconds, seconds_per_token
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model
mode, name, weights, length, max_seconds = sys.argv[1:6]
length, max_seconds = int(length), float(max_seconds)
model = (load_model(name) if weights == "shipped" else build_model(name, weights)).eval()
if mode == "estimate":
    try:
        estimate = plan_analysis(model, length, time_it=False).estimate
    except MemoryBudgetError as error:
        print(json.dumps({"status": "refused", "note": str(error)}))
    else:
        print(json.dumps({"status": "ok", "estimate": estimate.total}))
    sys.exit(0)
seconds = estimate_seconds(model, length, 1, seconds_per_token(model))
if seconds > max_seconds:
    note = f"forward alone estimated at {seconds / 60:.0f} min"
    print(json.dumps({"status": "too long", "note": note}))
    sys.exit(0)
# The estimate must not stop what we measure it against; the machine's RAM still bounds it.
analyze(model, length, progress=False, max_memory=psutil.virtual_memory().total)
print(json.dumps({"status": "ran", "peak": peak_memory_bytes()}))
"""


def _worker(mode: str, name: str, weights: str, length: int, max_seconds: float) -> dict:
    process = subprocess.run(
        [sys.executable, "-c", WORKER, mode, name, weights, str(length), str(max_seconds)],
        capture_output=True,
        text=True,
        check=False,
    )
    if process.returncode != 0:
        tail = process.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "note": tail[0]}
    return json.loads(process.stdout.strip().splitlines()[-1])


def _read_measured() -> dict[tuple[str, str, int], dict]:
    if not MEASURED.exists():
        return {}
    with MEASURED.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {(row["model"], row["weights"], int(row["length"])): row for row in rows}


def _append_measured(row: dict) -> None:
    new = not MEASURED.exists()
    with MEASURED.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def measure(name: str, weights: str, length: int, max_seconds: float) -> dict:
    """Run one analysis in a fresh subprocess; its measured peak (or why it was not run)."""
    started = time.perf_counter()
    result = _worker("measure", name, weights, length, max_seconds)
    return {
        "model": name,
        "weights": weights,
        "length": length,
        "status": result["status"],
        "peak": result.get("peak", ""),
        "seconds": f"{time.perf_counter() - started:.0f}",
        "load": f"{os.getloadavg()[0]:.1f}",
        "date": str(date.today()),
        "note": result.get("note", ""),
    }


def table_row(measured: dict, estimate: dict) -> str:
    head = f"| {measured['model']} | {measured['weights']} | {format_length(measured['length'])} |"
    if estimate["status"] == "refused":
        return f"{head} refused before the run | - | - | - | ({estimate['note']}) |"
    if estimate["status"] != "ok":
        return f"{head} estimate failed | - | - | - | ({estimate['note']}) |"
    guess = format_bytes(estimate["estimate"])
    if measured["status"] != "ran":
        why = f"{measured['note']}, load {measured['load']}" if measured["note"] else ""
        return f"{head} {guess} | not run: {measured['status']} | - | - | {why} |"
    peak = int(measured["peak"])
    ratio = estimate["estimate"] / peak
    ok = "yes" if abs(ratio - 1) <= TOLERANCE else "**no**"
    return (
        f"{head} {guess} | {format_bytes(peak)} | {ratio:.2f} | {ok} | "
        f"{measured['seconds']} s at load {measured['load']}, {measured['date']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHIPPED))
    parser.add_argument("--lengths", default="8k,60k,400k")
    parser.add_argument("--small", default="memmamba", help="models also run untrained, small")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--remeasure", action="store_true")
    parser.add_argument("--no-measure", action="store_true", help="table from stored rows only")
    parser.add_argument("--workers", type=int, default=1, help="measurements run at once")
    args = parser.parse_args()
    lengths = [parse_length(value) for value in args.lengths.split(",")]
    jobs = [(name, "shipped") for name in args.models.split(",") if name]
    jobs += [(name, "small") for name in args.small.split(",") if name]
    RESULTS.mkdir(exist_ok=True)
    measured = _read_measured()
    todo = [  # every model at the shortest length first
        (name, weights, length)
        for length in lengths
        for name, weights in jobs
        if ((name, weights, length) not in measured or args.remeasure) and not args.no_measure
    ]
    with ThreadPoolExecutor(args.workers) as pool:  # each measurement is its own process
        running = {pool.submit(measure, *key, args.max_seconds): key for key in todo}
        for future in as_completed(running):  # kept as they end: an interrupted call loses none
            measured[running[future]] = future.result()
            _append_measured(measured[running[future]])
            print(json.dumps(measured[running[future]]), flush=True)
    lines = [
        "| model | weights | length | estimate | measured peak | estimate / peak | within 15% "
        "| measured in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = [(name, weights, length) for name, weights in jobs for length in lengths]
    with ThreadPoolExecutor(args.workers) as pool:
        estimates = list(pool.map(lambda key: _worker("estimate", *key, args.max_seconds), keys))
    for (name, weights, length), estimate in zip(keys, estimates, strict=True):
        row = measured.get((name, weights, length))
        if row is None:
            row = {"model": name, "weights": weights, "status": "not measured", "note": ""}
        lines.append(table_row(dict(row, length=length), estimate))
    command = " ".join(["python benchmarks/memory_calibration.py", *sys.argv[1:]])
    text = (
        "# Memory estimate vs measured peak resident memory\n\n"
        f"`{command}`; estimates made {date.today()} on {platform.machine()} with "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); measurements from "
        f"`{MEASURED.name}` (date and load per row). Each run is `fidelity.analyze(model, "
        "length)` with its defaults in a fresh process; the estimate is the one `fidelity "
        "analyze` prints before the run (the process so far plus what the run adds), the "
        "peak is the process's `ru_maxrss`. 'small' is an untrained model of the `small` "
        "preset (the shipped checkpoints are `mini`); decimamba's default is built from "
        "mamba's.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
