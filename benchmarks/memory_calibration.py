"""Calibrate the memory estimate printed before a run against the measured peak resident memory.

    python benchmarks/memory_calibration.py                     # every shipped model + small
    python benchmarks/memory_calibration.py --models mamba --lengths 8k

Measuring: each (model, length) runs the README's first command, `fidelity analyze --model M
--length L` (its defaults: text probe, 512 anchors, etmf, eclmf, ssm_decay; results, figures
and report saved under `runs/memory-calibration/`), in a fresh subprocess through the CLI's
entry point at a fixed `--threads` (recorded: the ETMF threads each hold a working set),
which reports its peak resident memory from the OS (`VmHWM`); a row is run
only when the estimate does not refuse it and its forward alone is estimated within
`--max-seconds`. The measurements, with what the measured process held when it made its plan
(its baseline), are appended to `results/memory_calibration.csv` and reused by later calls
(`--remeasure` measures again), since they do not depend on the estimate.

Estimating: each row's estimate is made afresh by the current code, in a fresh subprocess
that runs the same command up to the plan it prints (what the run adds), and stops there; a
refused run says so. What the run adds is put on top of the measured process's baseline when
the row recorded it, else on the fresh process's own, which is only comparable when made in
the same environment (the same virtual environment and library files: their resident pages
differ by tens of MB between environments). The table goes to
`results/memory_calibration.md`.
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

import psutil

from fidelity.budget import RunEstimate, format_bytes
from fidelity.lengths import format_length, parse_length

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = RESULTS / "memory_calibration.csv"
TABLE = RESULTS / "memory_calibration.md"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "memory-calibration"  # git-ignored
TOLERANCE = 0.15
SHIPPED = ("memmamba", "mamba", "mamba2", "transformer", "compressive", "decimamba")
FIELDS = (
    "model",
    "weights",
    "length",
    "threads",
    "status",
    "peak",
    "baseline",
    "seconds",
    "load",
    "date",
    "note",
)

# argv: mode (estimate | table | measure), then `fidelity analyze` arguments. The command runs
# in this process through the CLI's entry point, with `plan_run` wrapped to record the estimate
# the CLI prints: "estimate" stops right after it (the process holds what the CLI holds before
# a run), "table" too but without timing a forward (its seconds are None), "measure" runs to
# the end (saving results, figures, report) and reports the process's peak resident memory
# from the OS.
WORKER = r"""
import dataclasses, json, os, sys
import fidelity.analysis
from fidelity.cli import main
mode, argv = sys.argv[1], sys.argv[2:]
plan_run, planned = fidelity.analysis.plan_run, {}
def recording_plan(*args, **kwargs):
    if mode == "table":  # the table needs the memory estimate only: no timed forward
        kwargs["time_it"] = False
    plan = plan_run(*args, **kwargs)
    if planned:  # the run re-plans without timing; keep what the CLI printed
        return plan
    parts = dataclasses.asdict(plan.estimate)
    planned.update(estimate=plan.estimate.total, seconds=plan.seconds, parts=parts)
    if mode != "measure":
        print(json.dumps({"status": "ok", **planned}), flush=True)
        os._exit(0)
    return plan
fidelity.analysis.plan_run = recording_plan
code = main(argv)
# this process's own high-water mark (ru_maxrss would start from the forking process's
# resident memory: Linux keeps it across exec)
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024  # KB
status = "ran" if code == 0 else ("refused" if code == 2 else "failed")
print(json.dumps({"status": status, "peak": peak, **planned}), flush=True)
"""


def analyze_argv(name: str, weights: str, length: int, threads: int, out: Path) -> list[str]:
    """The README's first command for one row (its defaults: text probe, 512 anchors, etmf,
    eclmf, ssm_decay) at ``threads`` CPU threads, saving to ``out``."""
    argv = ["analyze", "--model", name, "--length", str(length), "--no-progress"]
    argv += ["--threads", str(threads)]
    argv += ["--out", str(out), "--force"]
    return argv + ([] if weights == "shipped" else ["--preset", weights])


def _worker(mode: str, name: str, weights: str, length: int, threads: int) -> dict:
    out = RUNS / f"{name}-{weights}-{format_length(length)}-{threads}t"
    argv = analyze_argv(name, weights, length, threads, out)
    if mode == "measure":  # the estimate must not stop what we measure it against
        argv += ["--max-memory", str(psutil.virtual_memory().total)]
    process = subprocess.run(
        [sys.executable, "-c", WORKER, mode, *argv], capture_output=True, text=True, check=False
    )
    lines = process.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        tail = process.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "note": tail[0]}
    result = json.loads(lines[-1])
    if result["status"] != "ok" and result["status"] != "ran":
        result["note"] = (process.stderr.strip().splitlines()[-1:] or [""])[0]
    return result


Key = tuple[str, str, int, int]  # model, weights, length, threads


def _read_measured() -> dict[Key, dict]:
    if not MEASURED.exists():
        return {}
    with MEASURED.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        (row["model"], row["weights"], int(row["length"]), int(row["threads"])): row for row in rows
    }


def _append_measured(row: dict) -> None:
    """Append ``row``; a file written before a column was added is rewritten with it (empty in
    its old rows)."""
    if MEASURED.exists():
        with MEASURED.open(newline="") as handle:
            reader = csv.DictReader(handle)
            old = list(reader) if tuple(reader.fieldnames or ()) != FIELDS else None
        if old is not None:
            with MEASURED.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, FIELDS, restval="")
                writer.writeheader()
                writer.writerows(old)
    new = not MEASURED.exists()
    with MEASURED.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def measure(name: str, weights: str, length: int, threads: int, max_seconds: float) -> dict:
    """Run one analysis in a fresh subprocess; its measured peak (or why it was not run: the
    estimate refused it, or its forward alone is estimated beyond ``max_seconds``)."""
    started = time.perf_counter()
    result = _worker("estimate", name, weights, length, threads)
    if result["status"] == "ok" and result["seconds"] > max_seconds:
        minutes = result["seconds"] / 60
        result = {"status": "too long", "note": f"forward alone estimated at {minutes:.0f} min"}
    elif result["status"] == "ok":
        result = _worker("measure", name, weights, length, threads)
    return {
        "model": name,
        "weights": weights,
        "length": length,
        "threads": threads,
        "status": result["status"],
        "peak": result.get("peak", ""),
        "baseline": result.get("parts", {}).get("baseline", ""),
        "seconds": f"{time.perf_counter() - started:.0f}",
        "load": f"{os.getloadavg()[0]:.1f}",
        "date": str(date.today()),
        "note": result.get("note", ""),
    }


def planned_total(estimate: dict, measured: dict) -> tuple[int, str]:
    """The estimate's total and where its baseline (what the process holds when the plan is
    made) comes from: the measured run's own when it was recorded (what the current code adds
    on top of it), else the fresh process that made ``estimate`` (libraries' resident pages
    differ between environments by tens of MB, so such a ratio is looser)."""
    if not measured.get("baseline"):
        return estimate["estimate"], "fresh process"
    parts = dict(estimate["parts"], baseline=int(measured["baseline"]))
    return RunEstimate(**parts).total, "measured run"


def table_row(measured: dict, estimate: dict) -> str:
    head = (
        f"| {measured['model']} | {measured['weights']} | {format_length(measured['length'])} "
        f"| {measured['threads']} |"
    )
    if estimate["status"] != "ok":
        return f"{head} {estimate['status']}: {estimate.get('note', '')} | - | - | - | - | - |"
    total, source = planned_total(estimate, measured)
    guess = format_bytes(total)
    if measured["status"] == "too long":
        why = f"{measured['note']} at load {measured['load']}, over `--max-seconds`"
        not_run = "not run (not refused by the estimate)"
        return f"{head} {guess} | {not_run} | - | - | {source} | {why} |"
    if measured["status"] != "ran":
        why = f"{measured['note']}, load {measured['load']}" if measured["note"] else ""
        return f"{head} {guess} | {measured['status']} | - | - | {source} | {why} |"
    peak = int(measured["peak"])
    ratio = total / peak
    ok = "yes" if 1 <= ratio <= 1 + TOLERANCE else "**no**"
    return (
        f"{head} {guess} | {format_bytes(peak)} | {ratio:.2f} | {ok} | {source} | "
        f"{measured['seconds']} s at load {measured['load']}, {measured['date']} |"
    )


def _table_order(key: Key) -> tuple:
    """Shipped weights first, the models in the README's order, then by length, threads."""
    name, weights, length, threads = key
    rank = SHIPPED.index(name) if name in SHIPPED else len(SHIPPED)
    return (weights != "shipped", rank, name, weights, length, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHIPPED))
    parser.add_argument("--lengths", default="8k,60k,400k")
    parser.add_argument("--small", default="memmamba", help="models also run untrained, small")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--remeasure", action="store_true")
    parser.add_argument("--no-measure", action="store_true", help="table from stored rows only")
    parser.add_argument("--threads", default="1", help="CPU threads of the runs, e.g. 1,2")
    parser.add_argument("--workers", type=int, default=1, help="measurements run at once")
    parser.add_argument("--table", type=Path, default=TABLE, help="where the table goes")
    args = parser.parse_args()
    lengths = [parse_length(value) for value in args.lengths.split(",")]
    thread_counts = [int(value) for value in args.threads.split(",")]
    jobs = [(name, "shipped") for name in args.models.split(",") if name]
    jobs += [(name, "small") for name in args.small.split(",") if name]
    RESULTS.mkdir(exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    measured = _read_measured()
    todo = [  # every model at the shortest length first
        (name, weights, length, threads)
        for length in lengths
        for threads in thread_counts
        for name, weights in jobs
        if ((name, weights, length, threads) not in measured or args.remeasure)
        and not args.no_measure
    ]
    with ThreadPoolExecutor(args.workers) as pool:  # each measurement is its own process
        running = {pool.submit(measure, *key, args.max_seconds): key for key in todo}
        for future in as_completed(running):  # kept as they end: an interrupted call loses none
            measured[running[future]] = future.result()
            _append_measured(measured[running[future]])
            print(json.dumps(measured[running[future]]), flush=True)
    lines = [
        "| model | weights | length | threads | estimate | measured peak | estimate / peak "
        "| 1.00-1.15 | baseline from | measured in |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    measured = _read_measured()  # with any row another call stored meanwhile
    # every stored row stays in the table: a call for a few models must not drop the others
    asked = {
        (name, weights, length, threads)
        for name, weights in jobs
        for length in lengths
        for threads in thread_counts
    }
    keys = sorted(asked | set(measured), key=_table_order)
    with ThreadPoolExecutor(args.workers) as pool:
        estimates = list(pool.map(lambda key: _worker("table", *key), keys))
    for key, estimate in zip(keys, estimates, strict=True):
        name, weights, length, threads = key
        row = measured.get(key)
        if row is None:
            row = {"model": name, "weights": weights, "status": "not measured", "note": ""}
        lines.append(table_row(dict(row, length=length, threads=threads), estimate))
    command = " ".join(["python benchmarks/memory_calibration.py", *sys.argv[1:]])
    text = (
        "# Memory estimate vs measured peak resident memory\n\n"
        f"`{command}`; estimates made {date.today()} on {platform.machine()} with "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); measurements from "
        f"`{MEASURED.name}` (date and load per row). Each run is `fidelity analyze --model "
        "M --length L` (the README's first command, its default metrics, results saved) in "
        "a fresh process; the estimate is the one it prints before the run (the process so "
        "far plus what the run adds), made afresh by the current code on top of what the "
        "measured process held when it made its plan ('baseline from: measured run'; "
        "'fresh process' for rows measured before that was recorded: the baseline of the "
        "process that made the estimate now, which differs between environments by tens of "
        "MB in libraries' resident pages); the peak is the process's `VmHWM`, at the row's "
        "`--threads` (at one thread the peak does "
        "not depend on how threads are scheduled; each ETMF thread beyond the first adds its "
        "own working set, an amount the estimate counts whole). A run "
        "the estimate refuses is not run; one whose forward "
        "alone is estimated beyond `--max-seconds` on this (shared) machine is not run "
        "either, and its row says so. 'small' is an untrained model of the `small` preset "
        "(the shipped checkpoints are `mini`); decimamba's default is built from "
        "mamba's.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    args.table.write_text(text)


if __name__ == "__main__":
    main()
