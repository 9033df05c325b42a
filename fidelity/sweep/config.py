"""Sweep configuration: read the TOML file, validate every key and expand it into runs.

Everything is checked before anything runs (see :mod:`fidelity.sweep` for the format).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidelity.analysis import AnalysisOptions, check_metrics
from fidelity.budget import parse_bytes
from fidelity.devices import DEVICES
from fidelity.errors import InputError
from fidelity.lengths import format_length, parse_length
from fidelity.models.checkpoint import CONFIG_FILE
from fidelity.models.registry import MODELS, PRESETS, model_names
from fidelity.probes.tasks import TASKS
from fidelity.sweep.tables import TABLES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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
META_KEY = "sweep_run"
"""Key of a run's ``meta.json`` holding the run's spec, to recognise it when resuming."""

_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


LOAD_KEYS = ("preset", "random_init")
"""Keys of :data:`ANALYSIS_KEYS` that choose the model's weights (passed to
:func:`fidelity.load_model` for a registered name), not the analysis."""


@dataclass(frozen=True)
class RunSpec:
    """One analysis of a sweep: ``model`` (a registered name or an absolute checkpoint
    directory; ``preset`` / ``random_init`` for a registered name) and the run's
    :class:`~fidelity.analysis.AnalysisOptions` (length in tokens, probe, seed, ...)."""

    name: str
    model: str
    options: AnalysisOptions
    preset: str | None = None
    random_init: bool = False

    @property
    def length(self) -> int:
        return self.options.length

    @property
    def probe(self) -> str:
        return self.options.probe

    @property
    def seed(self) -> int:
        return self.options.seed

    def identity(self) -> dict[str, Any]:
        """The spec as JSON gives it back; stored in the run's meta to recognise it later
        (``name``, ``model``, ``length``, ``probe``, ``seed`` and ``options``: the values of
        :data:`ANALYSIS_KEYS`, a layout kept so that earlier sweeps resume)."""
        loading = {"preset": self.preset, "random_init": self.random_init}
        options = {
            key: loading[key] if key in LOAD_KEYS else getattr(self.options, key)
            for key in ANALYSIS_KEYS
        }
        spec = {
            "name": self.name,
            "model": self.model,
            "length": self.length,
            "probe": self.probe,
            "seed": self.seed,
            "options": options,
        }
        return json.loads(json.dumps(spec))


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
        raise InputError(f"{path} is not valid TOML: {error}") from None
    try:
        return parse_sweep_config(data)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


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
        raise InputError('missing [sweep] table; it needs at least out = "DIR"')
    _reject_unknown(sweep, SWEEP_KEYS, "[sweep]")
    if "out" not in sweep or not isinstance(sweep["out"], str) or not sweep["out"].strip():
        raise InputError(f"[sweep] out must be a directory path string, got {sweep.get('out')!r}")
    defaults = _option_values(sweep, "[sweep]")
    probe = _probe(sweep.get("probe", "text"), "[sweep] probe")
    seed = check_integer(sweep.get("seed", 0), "[sweep] seed", minimum=0)
    runs = _grid_runs(sweep, defaults, probe, seed) + _explicit_runs(
        data.get("run", []), defaults, probe, seed
    )
    if not runs:
        raise InputError(
            "no runs: give a grid in [sweep] (models = [...], lengths = [...]) or [[run]] tables"
        )
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(
            f"run names {repeated} occur more than once; give [[run]] tables distinct names"
        )
    out = Path(sweep["out"]).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"[sweep] out: {out} is a file; expected a directory")
    return SweepConfig(out, tuple(runs))


def _reject_unknown(table: Mapping[str, Any], accepted: Iterable[str], where: str) -> None:
    accepted = tuple(accepted)
    unknown = [key for key in table if key not in accepted]
    if unknown:
        raise InputError(
            f"unknown key {unknown[0]!r} in {where}; accepted keys: {', '.join(accepted)}"
        )


def check_integer(value: Any, where: str, minimum: int) -> int:
    """``value`` when it is an integer >= ``minimum``; ValueError naming ``where`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _integers(value: Any, where: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where} must be a non-empty list of integers, got {value!r}")
    return tuple(check_integer(item, f"{where}[{i}]", minimum) for i, item in enumerate(value))


def _string_list(table: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = table[key]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where} {key} must be a non-empty list, got {value!r}")
    repeated = [item for i, item in enumerate(value) if item in value[:i]]
    if repeated:
        raise InputError(f"{where} {key} lists {repeated[0]!r} more than once")
    return value


def _length(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f'{where} must be a length like "8k" or 8000, got {value!r}')
    try:
        return parse_length(value)
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None


def _probe(value: Any, where: str) -> str:
    if value not in TASKS:
        raise InputError(f"{where}: unknown probe {value!r}; choose from {', '.join(TASKS)}")
    return value


def _model(value: Any, where: str) -> str:
    """A registered name as is, or a checkpoint directory made absolute."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} must be a model name or checkpoint directory, got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise InputError(
                f"{where}: {value} has no {CONFIG_FILE}; expected a checkpoint directory "
                "(written by fidelity train, or a mamba_ssm / Hugging Face checkpoint)"
            )
        return str(path.resolve())
    if value in MODELS:
        return value
    raise InputError(
        f"{where}: {value!r} is neither a registered model ({', '.join(model_names())}) "
        "nor an existing checkpoint directory"
    )


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not Path(value).expanduser().exists():
        raise InputError(f"{where} must be an existing file or directory, got {value!r}")
    return str(Path(value).expanduser().resolve())


def _chunk_size(value: Any, where: str) -> int | str | None:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.lower() == "none":
        return None
    try:
        return _length(value, where)
    except ValueError:
        raise InputError(
            f'{where} must be "auto", "none" or a token count like 4096, got {value!r}'
        ) from None


def _memory(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return check_integer(value, where, minimum=1)
    if not isinstance(value, str):
        raise InputError(f'{where} must be a size like "4GB" or a byte count, got {value!r}')
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None


def _metrics(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise InputError(f"{where} must be a list of metric names, got {value!r}")
    try:
        return tuple(check_metrics(value))
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None


def _device(value: Any, where: str) -> str:
    """The device's form only: whether it exists is checked where the runs will run."""
    if not isinstance(value, str) or not (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
        raise InputError(
            f"{where}: unknown device {value!r}; choose from {', '.join(DEVICES)} or cuda:N"
        )
    return value


def _preset(value: Any, where: str) -> str:
    if value not in PRESETS:
        raise InputError(f"{where}: unknown preset {value!r}; choose from {', '.join(PRESETS)}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where} must be true or false, got {value!r}")
    return value


_OPTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "metrics": _metrics,
    "anchors": lambda value, where: check_integer(value, where, minimum=16),
    "distances": lambda value, where: _integers(value, where, minimum=0),
    "layers": lambda value, where: _integers(value, where, minimum=0),
    "batch": lambda value, where: check_integer(value, where, minimum=1),
    "device": _device,
    "preset": _preset,
    "random_init": _boolean,
    "chunk_size": _chunk_size,
    "max_memory": _memory,
    "n_boot": lambda value, where: check_integer(value, where, minimum=0),
    "text": _path,
    "tokenizer": _path,
}


def _option_values(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The :data:`ANALYSIS_KEYS` ``table`` sets, each checked and converted."""
    return {
        key: _OPTION_CHECKS[key](table[key], f"{where} {key}")
        for key in ANALYSIS_KEYS
        if key in table
    }


def _run_spec(
    name: str, model: str, length: int, probe: str, seed: int, values: Mapping[str, Any], where: str
) -> RunSpec:
    """A run from its grid values and its checked option ``values``."""
    loading = {key: values[key] for key in LOAD_KEYS if key in values}
    analysis = {key: value for key, value in values.items() if key not in LOAD_KEYS}
    try:
        options = AnalysisOptions(length, probe, seed=seed, **analysis)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: {error}") from None
    return RunSpec(name, model, options, **loading)


def _grid_runs(
    sweep: Mapping[str, Any], values: Mapping[str, Any], probe: str, seed: int
) -> list[RunSpec]:
    given = [key for key in GRID_KEYS if key in sweep]
    if not given:
        return []
    if "models" not in sweep or "lengths" not in sweep:
        raise InputError(
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
        raise InputError(f"[sweep] lengths name the same length twice: {sweep['lengths']}")
    probes = [
        _probe(p, f"[sweep] probes[{i}]")
        for i, p in enumerate(
            _string_list(sweep, "probes", "[sweep]") if "probes" in sweep else [probe]
        )
    ]
    seeds = list(_integers(sweep["seeds"], "[sweep] seeds", 0)) if "seeds" in sweep else [seed]
    if len(set(seeds)) < len(seeds):
        raise InputError(f"[sweep] seeds lists a seed twice: {seeds}")
    labels = _model_labels(models)
    return [
        _run_spec(_run_name(labels[m], n, p, s), m, n, p, s, values, "[sweep]")
        for m, n, p, s in itertools.product(models, lengths, probes, seeds)
    ]


def _explicit_runs(
    tables: Any, defaults: Mapping[str, Any], probe: str, seed: int
) -> list[RunSpec]:
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise InputError("run must be an array of tables ([[run]] sections)")
    runs = []
    for index, table in enumerate(tables):
        where = f"[[run]] #{index + 1}"
        _reject_unknown(table, (*RUN_KEYS, *ANALYSIS_KEYS), where)
        for key in ("model", "length"):
            if key not in table:
                raise InputError(f"{where} needs {key} = ...")
        model = _model(table["model"], f"{where} model")
        length = _length(table["length"], f"{where} length")
        run_probe = _probe(table.get("probe", probe), f"{where} probe")
        run_seed = check_integer(table.get("seed", seed), f"{where} seed", minimum=0)
        values = {**defaults, **_option_values(table, where)}
        name = table.get("name")
        if name is None:
            name = _run_name(_model_labels([model])[model], length, run_probe, run_seed)
        elif not isinstance(name, str) or not _RUN_NAME.match(name) or name in TABLES:
            raise InputError(
                f"{where} name must be letters, digits, '.', '_' or '-' (not starting with "
                f"'.' or '-', and none of {', '.join(TABLES)}), got {name!r}"
            )
        runs.append(_run_spec(name, model, length, run_probe, run_seed, values, where))
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
