"""A checkpoint series: memory (and task accuracy) against the training step.

``fidelity compare runs/ind`` (a training run directory), ``fidelity compare 'runs/ind/ckpt-*'``
(a quoted glob) or the shell-expanded list of checkpoint directories analyzes every checkpoint
with one :class:`~fidelity.analysis.AnalysisOptions` and lines the results up by training step:
per layer the ETMF summary statistics (half-life, contiguous length, farthest distance, memory
mass, ...) and, when the probe is a memory task, the task's accuracy at the analysis length
(Wilson 95% interval, rows from test seeds the training never used). In a notebook:
``fidelity.analyze_series("runs/ind", options)`` returns a :class:`Series`.

The step of a checkpoint is ``meta.training.step`` of its ``config.json`` (what ``fidelity
train`` writes), else the ``<step>`` of a ``ckpt-<step>`` directory name. Every checkpoint of a
series must be the same model (type and configuration); ``InputError`` otherwise.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fidelity.destinations import Legacy
from fidelity.errors import InputError
from fidelity.progress import ProgressReporter, as_reporter
from fidelity.results import FidelityResult
from fidelity.results_io import result_directory, write_table
from fidelity.schema import SUMMARY_COLUMNS

ACCURACY_SEED = 2 * 10**9
"""First seed of the accuracy rows: training batches use seeds below 10^9 (``fidelity train``
with seed 0), so the series tests on rows no checkpoint saw."""
ACCURACY_BATCH = 16
SERIES_KIND = "series"
SERIES_FILES = ("series.csv", "results.csv", "meta.json", "report.html")
SERIES_LEGACY = Legacy(SERIES_FILES, frozenset({*SERIES_FILES, "series.png", "series.svg"}))
_GLOB_CHARACTERS = frozenset("*?[")
ACCURACY_COLUMNS = ("accuracy", "accuracy_low", "accuracy_high", "accuracy_rows")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series: its training ``step``, directory and model ``config``."""

    step: int
    path: Path
    config: dict


def is_checkpoint(path: Path) -> bool:
    """True for a directory holding a model checkpoint (``config.json`` and weights)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def is_checkpoint_source(source: str | os.PathLike[str]) -> bool:
    """True for what :func:`find_checkpoints` takes: a checkpoint directory, a training run
    directory (holding ``ckpt-*`` folders) or a glob pattern (unexpanded)."""
    path = Path(source)
    if path.is_dir():
        return is_checkpoint(path) or any(path.glob("ckpt-*"))
    return not path.exists() and bool(_GLOB_CHARACTERS & set(str(source)))


def find_checkpoints(sources: Sequence[str | os.PathLike[str]]) -> list[Checkpoint]:
    """The checkpoints ``sources`` name, by step: each source is a checkpoint directory, a
    training run directory (its complete ``ckpt-<step>`` checkpoints) or a glob pattern such as
    ``"runs/ind/ckpt-*"`` (the directories it matches that are checkpoints).

    ``InputError`` (one line) for a path that does not exist, a glob that matches no
    checkpoint, a directory that holds no checkpoint, checkpoints of different models, or two
    checkpoints at the same step."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    found: dict[Path, None] = {}
    for source in sources:
        found.update(dict.fromkeys(_expand(source)))
    if not found:
        raise InputError("no checkpoints given")
    checkpoints = sorted((_read(path) for path in found), key=lambda c: c.step)
    _check_same_model(checkpoints)
    steps = [c.step for c in checkpoints]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        paths = [str(c.path) for c in checkpoints if c.step == repeated[0]]
        raise InputError(
            f"several checkpoints at step {repeated[0]} ({', '.join(paths)}); a series takes "
            "one checkpoint per step (give one training run at a time)"
        )
    return checkpoints


def _expand(source: str | os.PathLike[str]) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        if is_checkpoint(path):
            return [path]
        from fidelity.train import checkpoint_dirs

        inside = [p for p in checkpoint_dirs(path) if is_checkpoint(p)]
        if not inside:
            raise InputError(
                f"{path} holds no checkpoint (no config.json with weights, and no complete "
                "ckpt-<step> folder); give a training run directory, checkpoint directories or "
                "a quoted glob such as 'runs/ind/ckpt-*'"
            )
        return inside
    if path.exists():
        raise InputError(f"{path} is a file; expected a checkpoint or training run directory")
    if not _GLOB_CHARACTERS & set(str(source)):
        raise InputError(f"{path} does not exist")
    matches = [Path(p) for p in sorted(glob.glob(str(source)))]
    checkpoints = [p for p in matches if p.is_dir() and is_checkpoint(p)]
    if not checkpoints:
        what = f"{len(matches)} paths, none a checkpoint" if matches else "nothing"
        raise InputError(f"the pattern {str(source)!r} matches {what}")
    return checkpoints


def _read(path: Path) -> Checkpoint:
    try:
        header = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path / 'config.json'} is not readable JSON: {error}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object")
    meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    step = training.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        suffix = path.name.removeprefix("ckpt-")
        if not (path.name.startswith("ckpt-") and suffix.isdigit()):
            raise InputError(
                f"{path} records no training step (no meta.training.step in config.json, and "
                "the directory is not named ckpt-<step>)"
            )
        step = int(suffix)
    config = header.get("config") if isinstance(header.get("config"), dict) else header
    return Checkpoint(step, path, {"model_type": header.get("model_type"), **config})


def _check_same_model(checkpoints: list[Checkpoint]) -> None:
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.config != first.config:
            differing = sorted(
                key
                for key in set(first.config) | set(other.config)
                if first.config.get(key) != other.config.get(key)
            )
            raise InputError(
                f"mixed models: {first.path} and {other.path} differ in {', '.join(differing)}; "
                "a series follows one model through training"
            )


def training_step(result: FidelityResult) -> int | None:
    """The training step a result's checkpoint was saved at (``meta["training_step"]``, else
    ``ckpt-<step>`` in its checkpoint path), None when it does not say."""
    step = result.meta.get("training_step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    name = Path(str(result.meta.get("checkpoint_path") or "")).name
    suffix = name.removeprefix("ckpt-")
    return int(suffix) if name.startswith("ckpt-") and suffix.isdigit() else None


class Series:
    """Results of one model's checkpoints, ordered by training step.

    ``results``: one :class:`FidelityResult` per checkpoint, each ``meta`` holding
    ``training_step`` and, for a memory-task probe, ``task_accuracy`` (solved, rows, low,
    high). ``table``: one row per (step, layer): ``step``, :data:`SUMMARY_COLUMNS` and
    :data:`ACCURACY_COLUMNS` (NaN without a memory-task probe). ``plot()`` draws accuracy,
    half-life, contiguous length and memory mass against the step; ``save(dir)`` writes the
    tables, figure and ``report.html``.
    """

    def __init__(self, results: Sequence[FidelityResult]):
        results = list(results)
        if not results:
            raise InputError("a series needs at least one result")
        steps = []
        for index, result in enumerate(results):
            if not isinstance(result, FidelityResult):
                raise TypeError(
                    f"results[{index}] is a {type(result).__name__}; expected FidelityResult"
                )
            step = training_step(result)
            if step is None:
                raise InputError(
                    f"result {index} ({result.label}) records no training step: analyze a "
                    "checkpoint written by fidelity train (ckpt-<step>)"
                )
            steps.append(step)
        order = sorted(range(len(results)), key=steps.__getitem__)
        self.results = [results[i] for i in order]
        self.steps = [steps[i] for i in order]
        if len(set(self.steps)) != len(self.steps):
            raise InputError(f"a series takes one result per step, got steps {self.steps}")
        self.table = self._build_table()

    def _build_table(self) -> pd.DataFrame:
        parts = []
        for step, result in zip(self.steps, self.results, strict=True):
            summary = result.summary[list(SUMMARY_COLUMNS)].copy()
            accuracy = result.meta.get("task_accuracy") or {}
            summary.insert(0, "step", step)
            rows = accuracy.get("rows")
            summary["accuracy"] = accuracy["solved"] / rows if rows else math.nan
            summary["accuracy_low"] = accuracy.get("low", math.nan)
            summary["accuracy_high"] = accuracy.get("high", math.nan)
            summary["accuracy_rows"] = float(rows) if rows else math.nan
            parts.append(summary)
        return pd.concat(parts, ignore_index=True).astype({"step": "int64"})

    @property
    def frame(self) -> pd.DataFrame:
        """Every result's tidy rows with a leading ``step`` column."""
        return pd.concat(
            [r.frame.assign(step=s) for s, r in zip(self.steps, self.results, strict=True)],
            ignore_index=True,
        )[["step", *self.results[0].frame.columns]]

    @property
    def label(self) -> str:
        meta = self.results[0].meta
        length = meta.get("length")
        from fidelity.lengths import format_length

        where = f", {format_length(length)}" if isinstance(length, int) else ""
        return f"{meta.get('model', 'model')} on {meta.get('probe', '?')}{where}"

    def plot(self, layers: Sequence[int] | None = None, title: str | None = None) -> Figure:
        """Accuracy (when measured), half-life, contiguous length and memory mass by layer
        against the training step (:func:`fidelity.reports.series.series_figure`)."""
        from fidelity.reports.series import series_figure

        return series_figure(self.table, layers=layers, title=title or self.label)

    def save(self, directory: str | os.PathLike[str], force: bool = False) -> Path:
        """Write ``series.csv`` (:attr:`table`), ``results.csv`` (:attr:`frame`),
        ``meta.json`` (every checkpoint's meta), ``series.png``/``.svg`` and ``report.html``
        atomically (the rules of :meth:`FidelityResult.save`); returns the path."""
        from fidelity.reports.html import figure_png
        from fidelity.reports.series import render_series

        inputs = [Path(p) for r in self.results if (p := str(r.meta.get("checkpoint_path") or ""))]
        with result_directory(directory, force, SERIES_KIND, SERIES_LEGACY, inputs) as staging:
            write_table(self.table, staging / "series.csv")
            write_table(self.frame, staging / "results.csv")
            meta = {"series": {"steps": self.steps}, "runs": [r.meta for r in self.results]}
            text = json.dumps(meta, indent=2, allow_nan=False)
            (staging / "meta.json").write_text(text + "\n", encoding="utf-8")
            figure = self.plot()
            png = figure_png(figure, dpi=150)
            (staging / "series.png").write_bytes(png)
            figure.savefig(staging / "series.svg", format="svg", metadata={"Date": None})
            (staging / "report.html").write_text(render_series(self, png), encoding="utf-8")
        return Path(directory)

    def _repr_html_(self) -> str:
        from fidelity.reports.series import render_series_fragment

        return render_series_fragment(self)


def analyze_series(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Checkpoint],
    options,
    *,
    trials: int = 50,
    progress: bool | ProgressReporter = True,
    on_checkpoint=None,
) -> Series:
    """Analyze every checkpoint ``checkpoints`` names (see :func:`find_checkpoints`) with the
    :class:`~fidelity.analysis.AnalysisOptions` ``options`` and, when its probe is a memory
    task, score ``trials`` rows of the task at the analysis length. ``on_checkpoint(index,
    total, result)`` is called after each checkpoint (the CLI prints a line)."""
    from fidelity.analysis import AnalysisOptions, run_analysis
    from fidelity.metrics.task_accuracy import task_accuracy
    from fidelity.models.loading import load_model
    from fidelity.probes.memory_tasks import MEMORY_TASKS

    if not isinstance(options, AnalysisOptions):
        raise TypeError(f"options must be AnalysisOptions, got {type(options).__name__}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"trials must be a positive integer, got {trials!r}")
    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [checkpoints]
    listed = list(checkpoints)
    if all(isinstance(c, Checkpoint) for c in listed) and listed:
        found = listed
    else:
        found = find_checkpoints(listed)
    reporter = as_reporter(progress)
    results = []
    try:
        overall = reporter.start("checkpoints", len(found))
        for index, checkpoint in enumerate(found):
            model = load_model(checkpoint.path)
            result = run_analysis(model, options, progress=False)
            meta = {**result.meta, "training_step": checkpoint.step}
            if options.probe in MEMORY_TASKS:
                scored = task_accuracy(
                    model,
                    options.probe,
                    options.length,
                    trials=trials,
                    batch=min(trials, ACCURACY_BATCH),
                    seed=ACCURACY_SEED,
                )
                meta["task_accuracy"] = {
                    "task": options.probe,
                    "length": options.length,
                    "solved": scored.solved,
                    "rows": scored.trials,
                    "low": scored.low,
                    "high": scored.high,
                    "seed": ACCURACY_SEED,
                }
            result = FidelityResult(result.frame, result.summary, meta)
            results.append(result)
            overall.update(index + 1)
            if on_checkpoint is not None:
                on_checkpoint(index, len(found), result)
    finally:
        reporter.close()
    return Series(results)
