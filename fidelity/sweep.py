"""Sweeps: many analyses (model x length x probe x seed) from one TOML file, run in parallel
on this machine or on a Ray cluster, collected into one tidy table.

Config::

    [sweep]
    out = "runs/sweep1"                       # every run and the tables go here
    models = ["memmamba", "runs/mm/ckpt-1000"]  # grid: registered names, checkpoint dirs
    lengths = ["2k", "8k"]
    probes = ["text", "random"]               # optional, default [probe] ("text")
    seeds = [0, 1]                            # optional, default [seed] (0)
    metrics = ["etmf", "eclmf"]               # defaults shared by all runs (ANALYSIS_KEYS)
    anchors = 256

    [[run]]                                   # explicit runs, beside or instead of the grid
    model = "mamba"
    length = "4k"
    probe = "passkey"                         # optional, default [sweep] probe
    name = "mamba-passkey"                    # optional, default <model>-<length>-<probe>-s<seed>
    anchors = 128                             # any shared default can be overridden

Relative paths are taken from the current directory (as on the command line) and stored
absolute, so worker processes and Ray tasks find them. The whole config, and every run already
in ``out``, is checked before anything runs.

Layout of ``out``: one directory per run (:meth:`FidelityResult.save`, atomic), plus
``sweep.csv`` (every run's frame with ``run``, ``probe`` and ``seed`` columns first; ``model``,
``checkpoint`` and ``length`` are already frame columns), ``sweep_summary.csv`` (per run and
layer) and ``failures.csv`` (one row per failed run with its error; only a header when none).
A run whose directory is complete is skipped (resumable sweeps) unless ``force``; a failing run
is recorded and the others go on.

Workers load the model and run :func:`fidelity.analyze`; the results come back to this process,
which writes ``out`` (so on a Ray cluster only checkpoints and the package must be reachable
from the nodes, not ``out``).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fidelity.analysis import DEFAULT_METRICS, check_metrics
from fidelity.budget import parse_bytes
from fidelity.devices import DEVICES, resolve_device
from fidelity.lengths import format_length, parse_length
from fidelity.models.checkpoint import CONFIG_FILE
from fidelity.models.registry import MODELS, PRESETS, model_names
from fidelity.probes.tasks import TASKS
from fidelity.results import FRAME_COLUMNS, RESULT_FILES, SUMMARY_COLUMNS, FidelityResult

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

EXECUTORS = ("local", "ray")
GRID_KEYS = ("models", "lengths", "probes", "seeds")
RUN_KEYS = ("name", "model", "length", "probe", "seed")
ANALYSIS_KEYS = (
    "metrics",
    "anchors",
    "distances",
    "layers",
    "batch",
    "device",
    "preset",
    "random_init",
    "chunk_size",
    "max_memory",
    "n_boot",
    "text",
    "tokenizer",
)
"""Options of :func:`fidelity.analyze` a config may set in ``[sweep]`` (all runs) or per run."""
SWEEP_KEYS = ("out", *GRID_KEYS, "probe", "seed", *ANALYSIS_KEYS)
FRAME_TABLE = "sweep.csv"
SUMMARY_TABLE = "sweep_summary.csv"
FAILURE_TABLE = "failures.csv"
TABLES = (FRAME_TABLE, SUMMARY_TABLE, FAILURE_TABLE)
FAILURE_COLUMNS = ("run", "model", "length", "probe", "seed", "error", "traceback")
META_KEY = "sweep_run"
"""Key of a run's ``meta.json`` holding the run's spec, to recognise it when resuming."""

_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

Status = Literal["done", "skipped", "failed"]


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AnalysisOptions:
    """Options passed to :func:`fidelity.analyze` (and ``preset`` / ``random_init`` to
    :func:`fidelity.load_model` for registered names); defaults are analyze's own."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    anchors: int = 512
    distances: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    batch: int = 1
    device: str = "auto"
    preset: str | None = None
    random_init: bool = False
    chunk_size: int | str | None = "auto"
    max_memory: int | None = None
    n_boot: int = 200
    text: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One analysis of a sweep. ``model`` is a registered name or an absolute checkpoint
    directory; ``length`` is in tokens."""

    name: str
    model: str
    length: int
    probe: str
    seed: int
    options: AnalysisOptions = field(default_factory=AnalysisOptions)

    def identity(self) -> dict[str, Any]:
        """The spec as JSON gives it back; stored in the run's meta to recognise it later."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: where results go and the runs, in config order."""

    out: Path
    runs: tuple[RunSpec, ...]


def load_sweep_config(path: str | os.PathLike[str]) -> SweepConfig:
    """Read and validate a sweep TOML file; ValueError names the file, the key and what is
    accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    try:
        return parse_sweep_config(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def parse_sweep_config(data: Mapping[str, Any]) -> SweepConfig:
    """Validate a parsed config (``{"sweep": {...}, "run": [{...}, ...]}``, as TOML gives it).

    Checks everything before anything runs: unknown keys, lengths, probes, metrics, presets,
    devices, model names and checkpoint directories, paths, duplicate run names.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"a sweep config must be a mapping, got {type(data).__name__}")
    _reject_unknown(data, ("sweep", "run"), "top level (tables)")
    sweep = data.get("sweep")
    if not isinstance(sweep, Mapping):
        raise ValueError('missing [sweep] table; it needs at least out = "DIR"')
    _reject_unknown(sweep, SWEEP_KEYS, "[sweep]")
    if "out" not in sweep or not isinstance(sweep["out"], str) or not sweep["out"].strip():
        raise ValueError(f"[sweep] out must be a directory path string, got {sweep.get('out')!r}")
    defaults = _analysis_options(sweep, AnalysisOptions(), "[sweep]")
    probe = _probe(sweep.get("probe", "text"), "[sweep] probe")
    seed = _integer(sweep.get("seed", 0), "[sweep] seed", minimum=0)
    runs = _grid_runs(sweep, defaults, probe, seed) + _explicit_runs(
        data.get("run", []), defaults, probe, seed
    )
    if not runs:
        raise ValueError(
            "no runs: give a grid in [sweep] (models = [...], lengths = [...]) or [[run]] tables"
        )
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"run names {repeated} occur more than once; give [[run]] tables distinct names"
        )
    out = Path(sweep["out"]).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"[sweep] out: {out} is a file; expected a directory")
    return SweepConfig(out, tuple(runs))


def _reject_unknown(table: Mapping[str, Any], accepted: Iterable[str], where: str) -> None:
    accepted = tuple(accepted)
    unknown = [key for key in table if key not in accepted]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in {where}; accepted keys: {', '.join(accepted)}"
        )


def _integer(value: Any, where: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _integers(value: Any, where: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of integers, got {value!r}")
    return tuple(_integer(item, f"{where}[{i}]", minimum) for i, item in enumerate(value))


def _string_list(table: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = table[key]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} {key} must be a non-empty list, got {value!r}")
    repeated = [item for i, item in enumerate(value) if item in value[:i]]
    if repeated:
        raise ValueError(f"{where} {key} lists {repeated[0]!r} more than once")
    return value


def _length(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'{where} must be a length like "8k" or 8000, got {value!r}')
    try:
        return parse_length(value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _probe(value: Any, where: str) -> str:
    if value not in TASKS:
        raise ValueError(f"{where}: unknown probe {value!r}; choose from {', '.join(TASKS)}")
    return value


def _model(value: Any, where: str) -> str:
    """A registered name as is, or a checkpoint directory made absolute."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a model name or checkpoint directory, got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(
                f"{where}: {value} has no {CONFIG_FILE}; expected a checkpoint directory "
                "(written by fidelity train, or a mamba_ssm / Hugging Face checkpoint)"
            )
        return str(path.resolve())
    if value in MODELS:
        return value
    raise ValueError(
        f"{where}: {value!r} is neither a registered model ({', '.join(model_names())}) "
        "nor an existing checkpoint directory"
    )


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not Path(value).expanduser().exists():
        raise ValueError(f"{where} must be an existing file or directory, got {value!r}")
    return str(Path(value).expanduser().resolve())


def _chunk_size(value: Any, where: str) -> int | str | None:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.lower() == "none":
        return None
    try:
        return _length(value, where)
    except ValueError:
        raise ValueError(
            f'{where} must be "auto", "none" or a token count like 4096, got {value!r}'
        ) from None


def _memory(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _integer(value, where, minimum=1)
    if not isinstance(value, str):
        raise ValueError(f'{where} must be a size like "4GB" or a byte count, got {value!r}')
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _metrics(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a list of metric names, got {value!r}")
    try:
        return tuple(check_metrics(value))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _device(value: Any, where: str) -> str:
    """The device's form only: whether it exists is checked where the runs will run."""
    if not isinstance(value, str) or not (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
        raise ValueError(
            f"{where}: unknown device {value!r}; choose from {', '.join(DEVICES)} or cuda:N"
        )
    return value


def _preset(value: Any, where: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"{where}: unknown preset {value!r}; choose from {', '.join(PRESETS)}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


_OPTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "metrics": _metrics,
    "anchors": lambda value, where: _integer(value, where, minimum=16),
    "distances": lambda value, where: _integers(value, where, minimum=0),
    "layers": lambda value, where: _integers(value, where, minimum=0),
    "batch": lambda value, where: _integer(value, where, minimum=1),
    "device": _device,
    "preset": _preset,
    "random_init": _boolean,
    "chunk_size": _chunk_size,
    "max_memory": _memory,
    "n_boot": lambda value, where: _integer(value, where, minimum=0),
    "text": _path,
    "tokenizer": _path,
}


def _analysis_options(
    table: Mapping[str, Any], base: AnalysisOptions, where: str
) -> AnalysisOptions:
    values = {
        key: _OPTION_CHECKS[key](table[key], f"{where} {key}")
        for key in ANALYSIS_KEYS
        if key in table
    }
    return replace(base, **values)


def _grid_runs(
    sweep: Mapping[str, Any], options: AnalysisOptions, probe: str, seed: int
) -> list[RunSpec]:
    given = [key for key in GRID_KEYS if key in sweep]
    if not given:
        return []
    if "models" not in sweep or "lengths" not in sweep:
        raise ValueError(
            f"[sweep] has {', '.join(given)} but a grid needs both models and lengths "
            "(probes and seeds are optional)"
        )
    models = [
        _model(m, f"[sweep] models[{i}]")
        for i, m in enumerate(_string_list(sweep, "models", "[sweep]"))
    ]
    lengths = [
        _length(v, f"[sweep] lengths[{i}]")
        for i, v in enumerate(_string_list(sweep, "lengths", "[sweep]"))
    ]
    if len(set(lengths)) < len(lengths):
        raise ValueError(f"[sweep] lengths name the same length twice: {sweep['lengths']}")
    probes = [
        _probe(p, f"[sweep] probes[{i}]")
        for i, p in enumerate(
            _string_list(sweep, "probes", "[sweep]") if "probes" in sweep else [probe]
        )
    ]
    seeds = list(_integers(sweep["seeds"], "[sweep] seeds", 0)) if "seeds" in sweep else [seed]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"[sweep] seeds lists a seed twice: {seeds}")
    labels = _model_labels(models)
    return [
        RunSpec(_run_name(labels[m], n, p, s), m, n, p, s, options)
        for m, n, p, s in itertools.product(models, lengths, probes, seeds)
    ]


def _explicit_runs(tables: Any, defaults: AnalysisOptions, probe: str, seed: int) -> list[RunSpec]:
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ValueError("run must be an array of tables ([[run]] sections)")
    runs = []
    for index, table in enumerate(tables):
        where = f"[[run]] #{index + 1}"
        _reject_unknown(table, (*RUN_KEYS, *ANALYSIS_KEYS), where)
        for key in ("model", "length"):
            if key not in table:
                raise ValueError(f"{where} needs {key} = ...")
        model = _model(table["model"], f"{where} model")
        length = _length(table["length"], f"{where} length")
        run_probe = _probe(table.get("probe", probe), f"{where} probe")
        run_seed = _integer(table.get("seed", seed), f"{where} seed", minimum=0)
        options = _analysis_options(table, defaults, where)
        name = table.get("name")
        if name is None:
            name = _run_name(_model_labels([model])[model], length, run_probe, run_seed)
        elif not isinstance(name, str) or not _RUN_NAME.match(name) or name in TABLES:
            raise ValueError(
                f"{where} name must be letters, digits, '.', '_' or '-' (not starting with "
                f"'.' or '-', and none of {', '.join(TABLES)}), got {name!r}"
            )
        runs.append(RunSpec(name, model, length, run_probe, run_seed, options))
    return runs


def _model_labels(models: list[str]) -> dict[str, str]:
    """Short labels for run names: a registered name as is, a checkpoint directory by its last
    path components (as few as keep labels distinct: ``mm_ckpt-1000``, ``mamba_ckpt-1000``)."""
    labels = {m: m for m in models if not Path(m).is_absolute()}
    directories = {m: Path(m).parts[1:] for m in models if Path(m).is_absolute()}
    deepest = max((len(parts) for parts in directories.values()), default=1)
    for depth in range(1, deepest + 1):
        tails = {m: "_".join(parts[-depth:]) for m, parts in directories.items()}
        names = [*labels.values(), *tails.values()]
        if len(set(names)) == len(names):
            break
    labels.update(tails)
    return {m: re.sub(r"[^A-Za-z0-9._-]", "_", label) for m, label in labels.items()}


def _run_name(label: str, length: int, probe: str, seed: int) -> str:
    return f"{label}-{format_length(length)}-{probe}-s{seed}"


# ----------------------------------------------------------------------------- one run


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

    from fidelity.analysis import analyze
    from fidelity.models.registry import load_model

    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    options = spec.options
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if Path(spec.model).is_absolute() or not (options.preset or options.random_init):
                model = load_model(spec.model)
            else:
                model = load_model(spec.model, options.preset, random_init=options.random_init)
            result = analyze(
                model,
                spec.length,
                probe=spec.probe,
                metrics=options.metrics,
                anchors=options.anchors,
                distances=options.distances,
                layers=options.layers,
                seed=spec.seed,
                device=options.device,
                progress=False,
                batch=options.batch,
                text=options.text,
                tokenizer=options.tokenizer,
                chunk_size=options.chunk_size,
                max_memory=options.max_memory,
                n_boot=options.n_boot,
            )
            result.meta[META_KEY] = spec.identity()
            result.meta["torch_threads"] = torch.get_num_threads()
            error = trace = None
        except Exception as caught_error:
            result = None
            error = f"{type(caught_error).__name__}: {caught_error}".replace("\n", " ")
            trace = traceback.format_exc()
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    return RunReport(result, error, trace, notes, time.perf_counter() - started)


def _failed_report(error: BaseException, seconds: float) -> RunReport:
    """A report for a run whose worker died or could not send its result back."""
    message = f"{type(error).__name__}: {error}".replace("\n", " ")
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return RunReport(None, message, trace, (), seconds)


# ----------------------------------------------------------------------------- sweep


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
    ``failures`` (``failures.csv``): :data:`FAILURE_COLUMNS`.
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
    mapping) and write ``out`` (see the module docstring).

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
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if workers is not None:
        _integer(workers, "workers", minimum=1)
    if cpus_per_run is not None:
        _integer(cpus_per_run, "cpus_per_run", minimum=1)
    if ray_address is not None and executor != "ray":
        raise ValueError("ray_address applies to executor='ray' only")
    _check_devices(config, executor)
    done = _existing_runs(config, force)
    ray = _import_ray() if executor == "ray" else None
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
                report = _failed_report(error, report.seconds)
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
        _run_on_ray(ray, pending, workers, cpus_per_run or 1, ray_address, finish)
    elif pending:
        workers = workers or 1
        threads = cpus_per_run or max(1, _available_cpus() // workers)
        _run_locally(pending, workers, threads, finish)
    return _write_tables(config, done, failures, [outcomes[spec.name] for spec in config.runs])


def _check_devices(config: SweepConfig, executor: str) -> None:
    """Local runs: every device must exist here. Ray tasks ask for CPUs only, so no cuda."""
    for device in sorted({spec.options.device for spec in config.runs}):
        if executor == "ray" and device.startswith("cuda"):
            raise ValueError(
                f"device {device!r}: executor 'ray' runs analyses on CPUs only (its tasks ask "
                "for no GPU); set device = \"cpu\" or use executor 'local'"
            )
        if executor == "local":
            try:
                resolve_device(device)
            except ValueError as error:
                raise ValueError(f"device {device!r} of the sweep: {error}") from None


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
            raise ValueError(
                f"{directory} exists but holds no saved result ({', '.join(RESULT_FILES)}); "
                "remove it or choose another out"
            )
        if force:
            continue
        result = FidelityResult.load(directory)
        stored = result.meta.get(META_KEY)
        if stored != spec.identity():
            differs = _differences(stored, spec.identity())
            raise ValueError(
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


def _run_locally(
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
                report = _failed_report(error, time.perf_counter() - started)
            finish(futures[future], report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(
            "executor 'ray' needs Ray, which is not installed; pip install ray"
        ) from None
    return ray


def _run_on_ray(
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
                report = _failed_report(error, time.perf_counter() - submitted)
            finish(spec, report)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------------------- tables


def _write_tables(
    config: SweepConfig,
    done: Mapping[str, FidelityResult],
    failures: Mapping[str, RunReport],
    outcomes: list[RunOutcome],
) -> SweepResult:
    """``sweep.csv``, ``sweep_summary.csv`` and ``failures.csv`` in ``out``, runs in config
    order; each file is replaced atomically."""
    frames, summaries, failed = [], [], []
    for spec in config.runs:
        if spec.name in done:
            result = done[spec.name]
            frames.append(result.frame.assign(run=spec.name, probe=spec.probe, seed=spec.seed))
            summaries.append(
                result.summary.assign(
                    run=spec.name, probe=spec.probe, length=spec.length, seed=spec.seed
                )
            )
        elif spec.name in failures:
            report = failures[spec.name]
            row = (spec.name, spec.model, spec.length, spec.probe, spec.seed)
            failed.append((*row, report.error, report.traceback))
    frame_columns = ["run", "probe", "seed", *FRAME_COLUMNS]
    summary_lead = ["run", "probe", "length", "seed", *SUMMARY_COLUMNS]
    frame = _concat(frames, frame_columns)[frame_columns]
    summary = _concat(summaries, summary_lead)
    summary = summary[[*summary_lead, *(c for c in summary.columns if c not in summary_lead)]]
    failure_table = pd.DataFrame(failed, columns=list(FAILURE_COLUMNS))
    for table, name in (
        (frame, FRAME_TABLE),
        (summary, SUMMARY_TABLE),
        (failure_table, FAILURE_TABLE),
    ):
        _write_csv(table, config.out / name)
    return SweepResult(config.out, outcomes, frame, summary, failure_table)


def _concat(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame(columns=columns)
    return pd.concat(tables, ignore_index=True)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """CSV (NaN as an empty field) written beside ``path`` and renamed into place."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        table.to_csv(staging, index=False, na_rep="")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
