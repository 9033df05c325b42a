"""Running a sweep: skip runs already complete in ``out``, hand the rest to an executor, save
each result as it arrives and write the sweep's tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fidelity.destinations import check_writable
from fidelity.errors import InputError
from fidelity.results import RESULT_FILES, FidelityResult
from fidelity.sweep.config import (
    META_KEY,
    RunSpec,
    SweepConfig,
    check_integer,
    load_sweep_config,
    parse_sweep_config,
)
from fidelity.sweep.executors import (
    EXECUTORS,
    RunReport,
    available_cpus,
    check_devices,
    failed_report,
    import_ray,
    run_locally,
    run_on_ray,
)
from fidelity.sweep.tables import write_tables

Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class RunOutcome:
    """How one run of a sweep ended: ``status`` is done, skipped (already complete in
    ``out``) or failed (``error`` says why)."""

    name: str
    status: Status
    directory: Path
    seconds: float = 0.0
    error: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class SweepResult:
    """A finished sweep: ``outcomes`` in config order, and the tables it wrote to ``out``.

    ``frame`` (``sweep.csv``): ``run, probe, seed`` then the results frame columns.
    ``summary`` (``sweep_summary.csv``): ``run, probe, length, seed`` then the summary columns.
    ``failures`` (``failures.csv``): :data:`~fidelity.sweep.tables.FAILURE_COLUMNS`.
    """

    out: Path
    outcomes: list[RunOutcome]
    frame: pd.DataFrame
    summary: pd.DataFrame
    failures: pd.DataFrame

    @property
    def failed(self) -> list[str]:
        """Names of the runs that failed."""
        return [outcome.name for outcome in self.outcomes if outcome.status == "failed"]


def run_sweep(
    config: SweepConfig | str | os.PathLike[str] | Mapping[str, Any],
    executor: str = "local",
    workers: int | None = None,
    force: bool = False,
    progress: Callable[[RunOutcome], None] | None = None,
    *,
    ray_address: str | None = None,
    cpus_per_run: int | None = None,
) -> SweepResult:
    """Run every analysis of ``config`` (a :class:`SweepConfig`, a TOML path or a parsed
    mapping) and write ``out`` (see :mod:`fidelity.sweep`).

    ``executor``: ``"local"`` (a process pool of ``workers`` processes, default 1, each with
    ``cpus_per_run`` torch threads, default cpu_count // workers) or ``"ray"`` (one task per
    run with ``num_cpus=cpus_per_run``, default 1, on the cluster at ``ray_address`` or a local
    instance; at most ``workers`` tasks in flight, default all). ``force`` reruns runs already
    complete in ``out``. ``progress`` is called with each run's :class:`RunOutcome` as it ends
    (skipped runs first). Failing runs do not stop the others; see ``SweepResult.failed``.
    """
    if not isinstance(config, SweepConfig):
        config = (
            parse_sweep_config(config) if isinstance(config, Mapping) else load_sweep_config(config)
        )
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if workers is not None:
        check_integer(workers, "workers", minimum=1)
    if cpus_per_run is not None:
        check_integer(cpus_per_run, "cpus_per_run", minimum=1)
    if ray_address is not None and executor != "ray":
        raise InputError("ray_address applies to executor='ray' only")
    check_devices(config, executor)
    check_writable(config.out)
    done = _existing_runs(config, force)
    ray = import_ray() if executor == "ray" else None
    progress = progress or (lambda outcome: None)
    outcomes: dict[str, RunOutcome] = {}
    for spec in config.runs:
        if spec.name in done:
            outcomes[spec.name] = RunOutcome(spec.name, "skipped", config.out / spec.name)
            progress(outcomes[spec.name])
    failures: dict[str, RunReport] = {}
    pending = [spec for spec in config.runs if spec.name not in done]

    def finish(spec: RunSpec, report: RunReport) -> None:
        directory = config.out / spec.name
        if report.result is not None:
            try:
                report.result.save(directory, force=force)
                done[spec.name] = report.result
            except Exception as error:
                report = failed_report(error, report.seconds)
        if report.error is not None:
            failures[spec.name] = report
        status = "failed" if report.error is not None else "done"
        outcome = RunOutcome(
            spec.name, status, directory, report.seconds, report.error, report.warnings
        )
        outcomes[spec.name] = outcome
        progress(outcome)

    config.out.mkdir(parents=True, exist_ok=True)
    if pending and ray is not None:
        run_on_ray(ray, pending, workers, cpus_per_run or 1, ray_address, finish)
    elif pending:
        workers = workers or 1
        threads = cpus_per_run or max(1, available_cpus() // workers)
        run_locally(pending, workers, threads, finish)
    frame, summary, failure_table = write_tables(config, done, failures)
    ordered = [outcomes[spec.name] for spec in config.runs]
    return SweepResult(config.out, ordered, frame, summary, failure_table)


def _existing_runs(config: SweepConfig, force: bool) -> dict[str, FidelityResult]:
    """Runs already saved in ``out``, loaded (none with ``force``: they are redone).

    ValueError when a run's directory holds no saved result, or (without ``force``) holds a
    run made with other settings, so a changed config never silently mixes with old results.
    """
    completed = {}
    for spec in config.runs:
        directory = config.out / spec.name
        if not directory.exists():
            continue
        if not all((directory / name).is_file() for name in RESULT_FILES):
            raise InputError(
                f"{directory} exists but holds no saved result ({', '.join(RESULT_FILES)}); "
                "remove it or choose another out"
            )
        if force:
            continue
        result = FidelityResult.load(directory)
        stored = result.meta.get(META_KEY)
        if stored != spec.identity():
            differs = _differences(stored, spec.identity())
            raise InputError(
                f"{directory} holds a run made with different settings ({differs}); pass "
                "force=True (CLI: --force) to rerun it, or choose another out"
            )
        completed[spec.name] = result
    return completed


def _differences(stored: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return "it was not written by a sweep"
    flat_stored = {**stored, **(stored.get("options") or {})}
    flat_wanted = {**wanted, **wanted["options"]}
    keys = [k for k in flat_wanted if k != "options" and flat_stored.get(k) != flat_wanted[k]]
    return ", ".join(f"{k}: {flat_stored.get(k)!r} there, {flat_wanted[k]!r} now" for k in keys)
