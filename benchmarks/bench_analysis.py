"""Where ``fidelity analyze`` spends its time: the whole command, phase by phase.

Each run is a fresh process that runs the command exactly as the console script does
(``fidelity.cli.entry_point``), with timers wrapped around its phases: importing the CLI, the
modules ``analyze`` imports on first use, model loading, the probe, the plan, the captured
forward pass (with the metrics' hooks), each metric, and the save (tables, figures, report;
where the figures are drawn in the command's own process, as before the figure worker, also
split into building, PNG, SVG and report). Every phase gets wall and CPU seconds (CPU time of
the process: with ``--threads 1`` it barely moves with the load of other jobs); ``figure
worker`` is the CPU time of the command's child processes (the figure worker and its drawing
forks, which run beside the command: their time adds to the CPU used, not to the wall time
unless the command waits for them); ``total`` is the wall time of the process as its parent saw
it (start and exit included), and ``max RSS`` its peak memory (and its figure worker's).

``--baseline REV`` runs the same command with the ``fidelity`` package of git revision ``REV``
(exported to a temporary directory, first on ``PYTHONPATH``), alternating with the working
tree's, and prints the ratio current / baseline per phase (best of ``--repeats`` each, after one
warm-up run each). Both must have the same ``fidelity/kernels`` (the compiled kernel is shared).
Reproduce:

    python benchmarks/bench_analysis.py --model memmamba --length 60k --repeats 3 --threads 1
    python benchmarks/bench_analysis.py --model memmamba --length 60k --baseline 54be3b0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST_USE = (
    "fidelity.analysis",
    "fidelity.devices",
    "fidelity.models.loading",
    "fidelity.probes.tasks",
    "fidelity.probes.tokenizer",
    "fidelity.results",
    "fidelity.threads",
)
"""Modules ``fidelity analyze`` imports inside the command (timed as "first-use imports")."""


# ------------------------------------------------------------------ inside the timed process


def _child(argv: list[str], report: str) -> None:
    """Run ``fidelity`` with ``argv`` under phase timers; write the phases to ``report``."""
    import atexit
    import importlib
    import importlib.util
    import resource

    phases: dict[str, list[float]] = {}

    def add(name: str, wall: float, cpu: float) -> None:
        entry = phases.setdefault(name, [0.0, 0.0])
        entry[0] += wall
        entry[1] += cpu

    def timed(name, function):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                add(name, time.perf_counter() - wall, time.process_time() - cpu)

        return wrapper

    wall, cpu = time.perf_counter(), time.process_time()
    cli = importlib.import_module("fidelity.cli")
    add("imports: CLI start", time.perf_counter() - wall, time.process_time() - cpu)
    wall, cpu = time.perf_counter(), time.process_time()
    for name in FIRST_USE:
        importlib.import_module(name)
    add("imports: first use", time.perf_counter() - wall, time.process_time() - cpu)

    import dataclasses

    analysis = sys.modules["fidelity.analysis"]
    results = sys.modules["fidelity.results"]
    loading = sys.modules["fidelity.models.loading"]
    tasks = sys.modules["fidelity.probes.tasks"]
    loading.load_model = timed("load model", loading.load_model)
    tasks.make_probe = timed("probe", tasks.make_probe)
    analysis.make_probe = timed("probe", analysis.make_probe)
    analysis.plan_run = timed("plan", analysis.plan_run)
    analysis.capture = timed("forward + hooks", analysis.capture)
    for name, runner in list(analysis.METRIC_RUNNERS.items()):
        analysis.METRIC_RUNNERS[name] = dataclasses.replace(
            runner, compute=timed(f"metric {name}", runner.compute)
        )
    results.FidelityResult.save = timed("save (all)", results.FidelityResult.save)
    if "matplotlib" in sys.modules:  # figures drawn in this process (before the figure worker)
        from matplotlib.figure import Figure

        from fidelity.reports import html

        results.FidelityResult.figures = timed(
            "save: build figures", results.FidelityResult.figures
        )
        html.render_report = timed("save: report.html", html.render_report)
        savefig = Figure.savefig

        def timed_savefig(self, target, *args, **kwargs):
            kind = kwargs.get("format") or Path(str(target)).suffix.lstrip(".") or "png"
            return timed(f"save: {kind}", savefig)(self, target, *args, **kwargs)

        Figure.savefig = timed_savefig
    cli.main = timed("command", cli.main)
    worker_peak = [0]
    if importlib.util.find_spec("fidelity.reports.worker") is not None:
        from fidelity.reports.worker import FigureWorker

        close = FigureWorker.close

        def close_after_reading_its_peak(self) -> None:  # VmHWM of the worker, still alive
            status = Path(f"/proc/{self._process.pid}/status").read_text()
            worker_peak[0] = int(status.split("VmHWM:")[1].split()[0]) * 1024
            close(self)

        FigureWorker.close = close_after_reading_its_peak

    def report_phases() -> None:  # an exit handler: the entry point runs those, then exits
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the figure worker, its forks
        phases["figure worker (CPU of its processes)"] = [
            float("nan"),
            children.ru_utime + children.ru_stime,
        ]
        source = str(Path(sys.modules["fidelity"].__file__).parent)
        Path(report).write_text(
            json.dumps(
                {
                    "phases": phases,
                    "peak": peak,
                    "peak_worker": worker_peak[0],
                    "source": source,
                }
            )
        )

    atexit.register(report_phases)
    sys.argv = ["fidelity", *argv]
    cli.entry_point()  # as the console script: it ends the process


# ------------------------------------------------------------------ the parent


def _export(revision: str, directory: Path) -> Path:
    """The ``fidelity`` package of ``revision`` under ``directory`` (kernels shared with the
    working tree, which must match them)."""
    same = subprocess.run(
        ["git", "diff", "--quiet", revision, "--", "fidelity/kernels"], cwd=ROOT, check=False
    )
    if same.returncode != 0:
        sys.exit(f"fidelity/kernels differ between {revision} and the working tree")
    archive = directory / "baseline.tar"
    with archive.open("wb") as handle:
        subprocess.run(
            ["git", "archive", revision, "fidelity"], cwd=ROOT, stdout=handle, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    kernels = directory / "fidelity" / "kernels"
    for path in sorted(kernels.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    kernels.rmdir()
    kernels.symlink_to(ROOT / "fidelity" / "kernels")  # same resolved sources: no rebuild
    return directory


def _run(argv: list[str], pythonpath: Path | None, out: Path) -> dict:
    """One timed process; its phases, total wall time and peak memory."""
    report = out / "phases.json"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    code = (  # without the working directory on the path: the baseline must not be shadowed
        "import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p not in ('', '.')]; "
        "import bench_analysis; bench_analysis._child(sys.argv[3:], sys.argv[2])"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(report), *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    total = time.perf_counter() - started
    if done.returncode != 0 or not report.exists():
        sys.exit(f"the timed run failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(report.read_text())
    result["total"] = total
    return result


def _inside_command(phase: str) -> bool:
    """Whether ``phase`` is one of the command's top-level phases (not the command itself, an
    import, a part of the save or the figure worker's own CPU)."""
    return phase != "command" and not phase.startswith(("imp", "save:", "figure worker"))


def _best(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """Per phase, the lowest wall and the lowest CPU seconds over ``runs``; ``other`` is the
    command's time outside the named phases, ``total`` the process's wall time."""
    names = list(runs[0]["phases"])
    best = {}
    for name in names:
        best[name] = (
            min(r["phases"][name][0] for r in runs),
            min(r["phases"][name][1] for r in runs),
        )
    other = []
    for r in runs:
        inside = [v for k, v in r["phases"].items() if _inside_command(k)]
        command = r["phases"]["command"]
        other.append(
            (command[0] - sum(v[0] for v in inside), command[1] - sum(v[1] for v in inside))
        )
    best["other (in the command)"] = (min(o[0] for o in other), min(o[1] for o in other))
    best["total (process wall)"] = (min(r["total"] for r in runs), float("nan"))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="memmamba")
    parser.add_argument("--length", default="60k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1", help="--threads of the command")
    parser.add_argument("--baseline", help="git revision to compare with")
    parser.add_argument("--out", default="runs/bench-analysis", help="scratch output directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        "analyze",
        *("--model", args.model, "--length", args.length, "--threads", args.threads),
        *("--out", str(out / "result"), "--force", "--no-progress"),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        sides: dict[str, Path | None] = {"current": None}
        if args.baseline:
            sides = {"baseline": _export(args.baseline, Path(scratch)), "current": None}
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats + 1):  # the first round warms the caches
            for side, path in sides.items():
                result = _run(argv, path, out)
                if repeat:
                    runs[side].append(result)
    load = os.getloadavg()
    print(f"fidelity {' '.join(argv)}")
    print(f"best of {args.repeats} per phase; load average {load[0]:.2f} {load[1]:.2f}")
    best = {side: _best(r) for side, r in runs.items()}
    header = "| phase | " + " | ".join(f"{s} wall (s) | {s} CPU (s)" for s in sides)
    header += " | current / baseline (CPU) |" if args.baseline else " |"
    print(header)
    print("|---" * (1 + 2 * len(sides) + bool(args.baseline)) + "|")
    names = list(dict.fromkeys(name for side in sides for name in best[side]))
    for name in names:
        cells = []
        for side in sides:
            wall, cpu = best[side].get(name, (float("nan"), float("nan")))
            cells += [f"{wall:.2f}", f"{cpu:.2f}"]
        if args.baseline:
            base = best["baseline"].get(name, (float("nan"),) * 2)[1]
            mine = best["current"].get(name, (float("nan"),) * 2)[1]
            cells.append(f"{mine / base:.2f}" if base > 0 else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for side in sides:
        peak = max(r["peak"] for r in runs[side]) / 2**30
        worker = max(r["peak_worker"] for r in runs[side]) / 2**20
        print(
            f"{side}: max RSS {peak:.2f} GiB (the command), {worker:.0f} MiB (its figure worker, "
            f"VmHWM; 0: none); fidelity from {runs[side][0]['source']}"
        )


if __name__ == "__main__":
    main()
