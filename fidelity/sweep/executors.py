"""Sweep executors: run analyses in a local process pool or as Ray tasks.

Each run goes through :func:`execute_run` (load the model, :func:`fidelity.analyze`), which
never raises for a failing run: its :class:`RunReport` carries the result or the error.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidelity.devices import resolve_device
from fidelity.errors import InputError, MissingDependencyError
from fidelity.results import FidelityResult
from fidelity.sweep.config import META_KEY, RunSpec, SweepConfig

EXECUTORS = ("local", "ray")


@dataclass
class RunReport:
    """What a worker sends back: the result, or the error that stopped the run."""

    result: FidelityResult | None
    error: str | None
    traceback: str | None
    warnings: tuple[str, ...]
    seconds: float


def execute_run(spec: RunSpec, threads: int | None = None) -> RunReport:
    """Load ``spec``'s model and analyze it (in a worker process or Ray task).

    ``threads``: torch intra-op threads for this run (None leaves torch's setting). Never
    raises for a failing run: the error comes back in the report.
    """
    import torch

    from fidelity.analysis import run_analysis
    from fidelity.models.loading import load_model

    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if Path(spec.model).is_absolute() or not (spec.preset or spec.random_init):
                model = load_model(spec.model)
            else:
                model = load_model(spec.model, spec.preset, random_init=spec.random_init)
            result = run_analysis(model, spec.options, progress=False)
            result.meta[META_KEY] = spec.identity()
            result.meta["torch_threads"] = torch.get_num_threads()
            error = trace = None
        except Exception as caught_error:
            result = None
            error = f"{type(caught_error).__name__}: {caught_error}".replace("\n", " ")
            trace = traceback.format_exc()
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    return RunReport(result, error, trace, notes, time.perf_counter() - started)


def failed_report(error: BaseException, seconds: float) -> RunReport:
    """A report for a run whose worker died or could not send its result back."""
    message = f"{type(error).__name__}: {error}".replace("\n", " ")
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return RunReport(None, message, trace, (), seconds)


def check_devices(config: SweepConfig, executor: str) -> None:
    """Local runs: every device must exist here. Ray tasks ask for CPUs only, so no cuda."""
    for device in sorted({spec.options.device for spec in config.runs}):
        if executor == "ray" and device.startswith("cuda"):
            raise InputError(
                f"device {device!r}: executor 'ray' runs analyses on CPUs only (its tasks ask "
                "for no GPU); set device = \"cpu\" or use executor 'local'"
            )
        if executor == "local":
            try:
                resolve_device(device)
            except ValueError as error:
                raise InputError(f"device {device!r} of the sweep: {error}") from None


def available_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_locally(
    specs: list[RunSpec], workers: int, threads: int, finish: Callable[[RunSpec, RunReport], None]
) -> None:
    """Runs in a pool of ``workers`` fresh (spawned) processes, ``threads`` torch threads each."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    started = time.perf_counter()
    try:
        futures = {pool.submit(execute_run, spec, threads): spec for spec in specs}
        for future in as_completed(futures):
            try:
                report = future.result()
            except Exception as error:  # the worker died (BrokenProcessPool) or could not pickle
                report = failed_report(error, time.perf_counter() - started)
            finish(futures[future], report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def import_ray() -> Any:
    """The ``ray`` module; ImportError saying how to install it when missing."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "executor 'ray' needs Ray, which is not installed; pip install ray"
        ) from None
    return ray


def run_on_ray(
    ray: Any,
    specs: list[RunSpec],
    workers: int | None,
    cpus_per_run: int,
    address: str | None,
    finish: Callable[[RunSpec, RunReport], None],
) -> None:
    """One Ray task per run (``num_cpus=cpus_per_run``), at most ``workers`` in flight.

    Uses an already initialized Ray, else connects to ``address`` or starts a local instance
    (shut down again at the end)."""
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(execute_run)
    limit = workers or len(specs)
    waiting = list(specs)
    in_flight: dict[Any, tuple[RunSpec, float]] = {}
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < limit:
                spec = waiting.pop(0)
                in_flight[task.remote(spec, cpus_per_run)] = (spec, time.perf_counter())
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            spec, submitted = in_flight.pop(ready[0])
            try:
                report = ray.get(ready[0])
            except Exception as error:  # the task's worker died or the result was lost
                report = failed_report(error, time.perf_counter() - submitted)
            finish(spec, report)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
