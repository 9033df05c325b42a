"""Results of a fidelity analysis: tidy tables, figures, atomic save and exact load.

A :class:`FidelityResult` holds three things that ``fidelity.analyze`` produces:

``frame``
    one row per measurement, columns :data:`FRAME_COLUMNS` in that order. Horizontal metrics
    (``etmf``, ``etmf_chance``, ``etmf_norm``, ``etmf_acc``, ``etmf_raw``, ``ssm_decay``,
    ``influence``): ``layer == source_layer`` (0 = embeddings), ``distance`` in tokens.
    Vertical metrics (``eclmf``, ``eclmf_chance``, ``eclmf_norm``, ``cka``, ``eclmf_raw``):
    ``layer`` = target, ``distance = layer - source_layer``. Retrieval (``passkey_acc``,
    ``kv_acc``, ``passkey_digit_acc``, ``kv_digit_acc``), ``perplexity`` and
    ``bits_per_byte`` (distance 0): ``layer == source_layer == -1``, ``length`` the context,
    ``depth`` the needle depth in [0, 1] (NaN otherwise).
``summary``
    one row per (model, checkpoint, layer): :data:`SUMMARY_COLUMNS`, then any number of
    numeric columns such as ``etmf_norm@64`` (normalized ETMF at distance 64).
``meta``
    a JSON-serializable dict describing the run (model, checkpoint, trained, probe, length,
    seed, versions, ...). It is normalized on construction to what JSON gives back (tuples
    become lists, numpy scalars plain numbers, non-finite floats ``None``), so a saved and
    reloaded result compares equal to the one in memory.

A :class:`Comparison` lines several results up (``frame`` with a ``run`` column, per-layer
differences against the first run) and has the same ``plot`` / ``save`` surface.

Saving is atomic and loading exact; the files and how they are written and read are
:mod:`fidelity.results_io`'s job.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fidelity.destinations import Legacy
from fidelity.errors import InputError
from fidelity.reports.labels import format_token_count
from fidelity.results_io import (
    RESULT_FILES,
    check_complete,
    check_meta,
    check_table,
    read_meta,
    read_table,
    result_directory,
    write_table,
)
from fidelity.schema import FRAME_COLUMNS, SUMMARY_COLUMNS, SUMMARY_STATISTICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fidelity.reports.worker import FigureWorker

__all__ = [
    "COMPARISON_PLOT_KINDS",
    "FRAME_COLUMNS",
    "PLOT_KINDS",
    "RESULT_FILES",
    "SUMMARY_COLUMNS",
    "SUMMARY_STATISTICS",
    "Comparison",
    "FidelityResult",
]

LEGACY_SUMMARY_COLUMNS: dict[str, str] = {
    "model": "str",
    "checkpoint": "str",
    "layer": "int",
    "half_life": "float",
    "half_life_low": "float",
    "half_life_high": "float",
    "memory_length": "float",
    "memory_length_low": "float",
    "memory_length_high": "float",
}
"""Leading summary columns of runs saved before the shape-free statistics; :meth:`load`
reads them with ``memory_length`` as ``contiguous_length`` and the new statistics NaN."""

PLOT_KINDS: dict[str, tuple[str, ...]] = {
    "forgetting": ("etmf_norm",),
    "depth": ("eclmf_norm", "cka"),
    "heatmap": ("etmf_norm",),
    "retrieval": ("passkey_acc", "kv_acc"),
    "decay": ("ssm_decay",),
    "influence": ("influence",),
    "effrem": ("effrem",),
    "position_loss": ("position_loss",),
    "context_probe": ("context_probe", "context_probe_gain"),
}
"""Plot kinds of a single result and the metrics each needs (any one of them)."""

OUTPUT_PLOT_KINDS = ("effrem", "position_loss", "context_probe")
"""Kinds of the output-level metrics, drawn for one run and overlaid across runs alike."""

COMPARISON_PLOT_KINDS = ("forgetting", "depth", "summary", *OUTPUT_PLOT_KINDS)

_PLOTTERS = {
    "forgetting": ("plots", "forgetting_curve"),
    "depth": ("plots", "depth_curve"),
    "heatmap": ("plots", "forgetting_heatmap"),
    "retrieval": ("plots", "retrieval_grid"),
    "decay": ("plots", "decay_curves"),
    "influence": ("plots", "influence_curves"),
    "effrem": ("output_plots", "effrem_curves"),
    "position_loss": ("output_plots", "position_loss_curve"),
    "context_probe": ("output_plots", "context_probe_curves"),
}
"""The function drawing each plot kind: (module of :mod:`fidelity.reports`, name). The
drawing modules (matplotlib) are imported on first use: ``fidelity analyze`` draws in a worker
process (:mod:`fidelity.reports.worker`) and never imports them."""


def _plotter(kind: str) -> Callable[..., Figure]:
    module, name = _PLOTTERS[kind]
    return getattr(importlib.import_module(f"fidelity.reports.{module}"), name)


_PNG_DPI = 150
_NO_LAYOUT = {"figure.autolayout": False, "figure.constrained_layout.use": False}
"""The settings under which ``Figure.set_layout_engine(None)`` removes the engine."""

_FIGURE_FILES = frozenset(
    f"{kind}.{suffix}"
    for kind in (*PLOT_KINDS, *COMPARISON_PLOT_KINDS)
    for suffix in ("png", "svg")
)
LEGACY_RESULT = Legacy(RESULT_FILES, frozenset({*RESULT_FILES, "report.html", *_FIGURE_FILES}))
"""How a result directory written before manifests is recognised (and which files are ours)."""
LEGACY_COMPARISON = Legacy(
    ("comparison.csv", "summary.csv"),
    frozenset({"comparison.csv", "summary.csv", "report.html", *_FIGURE_FILES}),
)


def _write_figures(figures: Mapping[str, Figure], directory: Path) -> dict[str, bytes]:
    """``<name>.png`` and ``<name>.svg`` per figure; returns the PNG bytes (for the report).

    The layout is computed once, for the PNG: the SVG reuses it (the figure has no layout
    engine after the first render, so savefig draws the SVG once; a figure with an engine, even
    matplotlib's placeholder for ``"none"``, gets a layout pass first)."""
    import matplotlib

    from fidelity.reports import html

    images = {}
    for name, figure in figures.items():
        images[name] = html.figure_png(figure, dpi=_PNG_DPI)
        (directory / f"{name}.png").write_bytes(images[name])
        # no engine at all (`"none"` leaves a placeholder that savefig still lays out for):
        # the axes keep the positions just computed
        with matplotlib.rc_context(_NO_LAYOUT):
            figure.set_layout_engine(None)
        figure.savefig(directory / f"{name}.svg", format="svg", metadata={"Date": None})
    return images


_KIND_TITLES = {
    "forgetting": "Forgetting curve",
    "depth": "Depth curve",
    "heatmap": "Normalized ETMF",
    "retrieval": "Retrieval",
    "decay": "SSM decay",
    "influence": "Influence",
    "effrem": "Effective remembrance",
    "position_loss": "Loss by position",
    "context_probe": "Context-length probing",
}


# ----------------------------------------------------------------------------- single run


@dataclass(eq=False)
class FidelityResult:
    """One analysis run: tidy ``frame``, per-layer ``summary`` and ``meta`` (see module doc).

    Construction validates and copies the tables (canonical column order and dtypes, fresh
    index) and normalizes ``meta``; ValueError/TypeError say what is wrong.
    """

    frame: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.frame = check_table(self.frame, "frame", FRAME_COLUMNS, extra_numeric=False)
        self.summary = check_table(self.summary, "summary", SUMMARY_COLUMNS, extra_numeric=True)
        repeated = self.summary.duplicated(["model", "checkpoint", "layer"])
        if repeated.any():
            first = self.summary.loc[repeated, ["model", "checkpoint", "layer"]].iloc[0].to_dict()
            raise InputError(f"summary has several rows for {first}; expected one per layer")
        self.meta = check_meta(self.meta)

    @property
    def label(self) -> str:
        """Short name, e.g. ``"memmamba @ ckpt-5000, 60k"`` (``random init`` when untrained)."""
        models = list(dict.fromkeys(self.frame["model"]))
        model = str(self.meta.get("model") or (models[0] if len(models) == 1 else "result"))
        checkpoint = str(self.meta.get("checkpoint") or "")
        name = model
        if checkpoint:
            name += f" @ {checkpoint.rstrip('/').rsplit('/', 1)[-1]}"
        if self.untrained:
            name += " (random init)"
        length = self.meta.get("length")
        if isinstance(length, int | float) and not isinstance(length, bool):
            name += f", {format_token_count(length)}"
        return name

    @property
    def untrained(self) -> bool:
        """True when ``meta`` says the weights are a random initialization."""
        return self.meta.get("random_init") is True or self.meta.get("trained") is False

    @property
    def metrics(self) -> list[str]:
        """Metrics present in ``frame``, sorted."""
        return sorted(set(self.frame["metric"]))

    def plot_kinds(self) -> list[str]:
        """The kinds :meth:`plot` can draw for this result (those with rows)."""
        held = set(self.metrics)
        return [kind for kind, needs in PLOT_KINDS.items() if held & set(needs)]

    def plot(self, kind: str = "forgetting", **options: object) -> Figure:
        """Draw one figure; ``kind`` is one of :data:`PLOT_KINDS`.

        ``options`` go to the plotting function in :mod:`fidelity.reports.plots` (e.g.
        ``layers=[0, 4, 8]`` or ``title=...``). ValueError when the result has no rows for
        ``kind``, naming the metrics it does hold.
        """
        if kind not in PLOT_KINDS:
            raise InputError(f"unknown plot kind {kind!r}; choose one of {list(PLOT_KINDS)}")
        if kind not in self.plot_kinds():
            raise InputError(
                f"this result has no rows for the {kind!r} plot (needs metric "
                f"{' or '.join(map(repr, PLOT_KINDS[kind]))}); it holds metrics: "
                f"{', '.join(self.metrics) or 'none'}"
            )
        options.setdefault("title", None)
        if options["title"] is None:
            options["title"] = f"{_KIND_TITLES[kind]} — {self.label}"
        if kind == "position_loss":
            from fidelity.reports.output_plots import training_lengths

            options.setdefault("training_length", training_lengths({"": self.meta})[""])
        return _plotter(kind)(self.frame, **options)

    def figures(self) -> dict[str, Figure]:
        """Every figure this result has data for, by kind."""
        return {kind: self.plot(kind) for kind in self.plot_kinds()}

    def save(
        self,
        directory: str | os.PathLike[str],
        force: bool = False,
        *,
        worker: FigureWorker | None = None,
    ) -> Path:
        """Write the result to ``directory`` atomically; returns its path.

        Files: ``results.csv``, ``summary.csv``, ``meta.json``, ``<kind>.png`` and
        ``<kind>.svg`` per available figure, a self-contained ``report.html`` and the
        manifest listing them (:mod:`fidelity.destinations`). An existing directory raises
        FileExistsError unless ``force=True``; with force only the files fidelity wrote there
        are replaced, once the new ones are complete (and only in a result directory fidelity
        wrote; other files in it are kept). ``worker``: a started
        :class:`~fidelity.reports.worker.FigureWorker` draws the figures and the report from
        the written tables in its own processes (the same files; what ``fidelity analyze``
        does); by default they are drawn here.
        """
        with result_directory(directory, force, "result", LEGACY_RESULT) as staging:
            write_table(self.frame, staging / "results.csv")
            write_table(self.summary, staging / "summary.csv")
            text = json.dumps(self.meta, indent=2, allow_nan=False)
            (staging / "meta.json").write_text(text + "\n", encoding="utf-8")
            if worker is None:
                self.write_report(staging, _write_figures(self.figures(), staging))
            else:
                worker.draw(staging)
        return Path(directory)

    def write_report(self, directory: Path, images: Mapping[str, bytes]) -> None:
        """``directory/report.html`` embedding ``images`` (PNG bytes by plot kind)."""
        from fidelity.reports import html

        report = html.render_report(self, images)
        (directory / "report.html").write_text(report, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> FidelityResult:
        """Read a directory written by :meth:`save` (exact round trip, dtypes included).

        FileNotFoundError for a missing directory or file, ValueError for a corrupt one
        (naming the file and what was expected).
        """
        path = Path(directory)
        if not path.exists():
            raise FileNotFoundError(f"no result directory at {path}")
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a result directory")
        check_complete(path)
        return cls.read_tables(path)

    @classmethod
    def read_tables(cls, directory: Path) -> FidelityResult:
        """The result whose ``results.csv``, ``summary.csv`` and ``meta.json`` are in
        ``directory`` (:meth:`load` without its checks that the directory is a complete one:
        what a :class:`~fidelity.reports.worker.FigureWorker` reads from a save in progress)."""
        frame = read_table(directory / "results.csv", FRAME_COLUMNS, extra_numeric=False)
        summary = _read_summary(directory / "summary.csv")
        return cls(frame=frame, summary=summary, meta=read_meta(directory / "meta.json"))

    def _repr_html_(self) -> str:
        from fidelity.reports import html

        return html.render_fragment(self)


def _read_summary(path: Path) -> pd.DataFrame:
    """``summary.csv``; one saved before the shape-free statistics (a ``memory_length`` column,
    :data:`LEGACY_SUMMARY_COLUMNS`) is read with it as ``contiguous_length``, the rest NaN."""
    try:
        return read_table(path, SUMMARY_COLUMNS, extra_numeric=True)
    except ValueError as error:
        try:
            legacy = read_table(path, LEGACY_SUMMARY_COLUMNS, extra_numeric=True)
        except ValueError:
            raise error from None
    legacy = legacy.rename(columns=lambda c: c.replace("memory_length", "contiguous_length"))
    missing = {c: math.nan for c in SUMMARY_COLUMNS if c not in legacy}
    upgraded = legacy.assign(**missing)
    leading = list(SUMMARY_COLUMNS)
    return upgraded[leading + [c for c in upgraded.columns if c not in leading]]


# ----------------------------------------------------------------------------- comparison


def _unique_labels(labels: Sequence[str]) -> list[str]:
    """Labels made unique: every repeated label gets " (1)", " (2)", ... in order."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    taken = {label for label, count in counts.items() if count == 1}
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        if counts[label] == 1:
            unique.append(label)
            continue
        index = seen.get(label, 0)
        while True:
            index += 1
            candidate = f"{label} ({index})"
            if candidate not in taken:
                break
        seen[label] = index
        taken.add(candidate)
        unique.append(candidate)
    return unique


def _difference(
    value: pd.Series, low: pd.Series, high: pd.Series, ref: pd.DataFrame, column: str
) -> dict[str, pd.Series]:
    """``value - reference`` with the conservative interval [low - ref_high, high - ref_low]."""
    return {
        f"{column}_diff": value - ref[column],
        f"{column}_diff_low": low - ref[f"{column}_high"],
        f"{column}_diff_high": high - ref[f"{column}_low"],
    }


class Comparison:
    """Several results side by side; the first run is the reference for differences.

    ``results``: the runs; ``labels``: one per run (default: each result's ``label``);
    repeated labels are made unique with " (1)", " (2)", ... Attributes: ``frame`` (all rows
    with a leading ``run`` column), ``summary`` (see :meth:`build_summary`), ``warnings``
    (why runs may not be directly comparable, e.g. different probe or length).
    """

    def __init__(self, results: Sequence[FidelityResult], labels: Sequence[str] | None = None):
        results = list(results)
        if not results:
            raise InputError("a comparison needs at least one result")
        for index, result in enumerate(results):
            if not isinstance(result, FidelityResult):
                raise TypeError(
                    f"results[{index}] is a {type(result).__name__}; expected FidelityResult "
                    "(use Comparison.from_runs for run directories)"
                )
        if labels is None:
            labels = [result.label for result in results]
        labels = list(labels)
        if len(labels) != len(results) or not all(isinstance(x, str) for x in labels):
            raise InputError(
                f"labels must be {len(results)} strings (one per result), got {labels!r}"
            )
        self.results = results
        self.sources: list[Path] = []
        """Run directories the results were read from (see :meth:`from_runs`)."""
        self.labels = _unique_labels(labels)
        self.frame = pd.concat(
            [r.frame.assign(run=label) for r, label in zip(results, self.labels, strict=True)],
            ignore_index=True,
        )[["run", *FRAME_COLUMNS]]
        self.summary = self.build_summary()
        self.warnings = self._mismatches()

    @classmethod
    def from_runs(
        cls,
        runs: Iterable[FidelityResult | str | os.PathLike[str]],
        labels: Sequence[str] | None = None,
    ) -> Comparison:
        """Comparison of results and/or saved run directories (loaded with ``load``)."""
        results, sources = [], []
        for run in runs:
            if isinstance(run, FidelityResult):
                results.append(run)
            elif isinstance(run, str | os.PathLike):
                results.append(FidelityResult.load(run))
                sources.append(Path(run))
            else:
                raise TypeError(
                    f"a run must be a FidelityResult or a run directory, got {type(run).__name__}"
                )
        comparison = cls(results, labels)
        comparison.sources = sources
        return comparison

    def build_summary(self) -> pd.DataFrame:
        """Per run and layer: the summary statistics with intervals, and differences.

        Columns ``run`` then :data:`SUMMARY_COLUMNS` (without any extra columns), then for each
        of :data:`SUMMARY_STATISTICS` (farthest distance, peak distance, memory mass,
        contiguous length, half-life): ``<x>_diff`` (this run minus the first run, same layer)
        and ``<x>_diff_low`` / ``<x>_diff_high`` = ``[low - ref_high, high - ref_low]``.
        That interval is conservative: it holds every difference of two values lying in the
        runs' own intervals, so it is wider than a joint interval would be, and it is not a
        calibrated confidence interval for the difference. Differences are NaN for the first
        run itself, for layers the first run lacks, and where either run's value is NaN (a
        half-life is NaN when a curve is not an exponential decay).
        """
        numeric = [c for c, kind in SUMMARY_COLUMNS.items() if kind == "float"]
        reference = self.results[0].summary.set_index("layer")[numeric]
        parts = []
        for position, (result, label) in enumerate(zip(self.results, self.labels, strict=True)):
            summary = result.summary[list(SUMMARY_COLUMNS)]
            ref = reference.reindex(summary["layer"]).reset_index(drop=True)
            if position == 0:
                ref = ref * math.nan
            for column in SUMMARY_STATISTICS:
                summary = summary.assign(
                    **_difference(
                        summary[column],
                        summary[f"{column}_low"],
                        summary[f"{column}_high"],
                        ref,
                        column,
                    )
                )
            parts.append(summary.assign(run=label))
        table = pd.concat(parts, ignore_index=True)
        return table[["run", *[c for c in table.columns if c != "run"]]]

    def _mismatches(self) -> list[str]:
        found = []
        for key in ("probe", "length"):
            values = [result.meta.get(key) for result in self.results]
            if len({json.dumps(v) for v in values}) > 1:
                listing = ", ".join(
                    f"{label}: {value}" for label, value in zip(self.labels, values, strict=True)
                )
                found.append(f"runs differ in {key} ({listing}); curves may not be comparable")
        return found

    def plot_kinds(self) -> list[str]:
        """The kinds :meth:`plot` can draw (those with data)."""
        held = set(self.frame["metric"])
        has = {
            "forgetting": "etmf_norm" in held,
            "depth": bool(held & {"eclmf_norm", "cka"}),
            "summary": not self.summary.empty,
            **{kind: bool(held & set(PLOT_KINDS[kind])) for kind in OUTPUT_PLOT_KINDS},
        }
        return [kind for kind in COMPARISON_PLOT_KINDS if has[kind]]

    def plot(self, kind: str = "forgetting", **options: object) -> Figure:
        """Draw ``"forgetting"`` (overlay per layer), ``"depth"``, ``"summary"`` (by layer),
        or one of :data:`OUTPUT_PLOT_KINDS` (``"effrem"``, ``"position_loss"`` with each run's
        training length marked, ``"context_probe"``: every run overlaid).

        ``options`` go to :func:`~fidelity.reports.plots.comparison_overlay`,
        :func:`~fidelity.reports.plots.comparison_depth`,
        :func:`~fidelity.reports.plots.comparison_summary` or the
        :mod:`~fidelity.reports.output_plots` function of the kind.
        """
        if kind not in COMPARISON_PLOT_KINDS:
            raise InputError(
                f"unknown comparison plot kind {kind!r}; "
                f"choose one of {list(COMPARISON_PLOT_KINDS)}"
            )
        if kind not in self.plot_kinds():
            held = ", ".join(sorted(set(self.frame["metric"]))) or "none"
            raise InputError(f"no rows for the {kind!r} comparison plot; runs hold metrics: {held}")
        from fidelity.reports import output_plots, plots

        if kind == "forgetting":
            return plots.comparison_overlay(self.frame, **options)
        if kind == "depth":
            return plots.comparison_depth(self.frame, **options)
        if kind == "position_loss":
            metas = {label: r.meta for label, r in zip(self.labels, self.results, strict=True)}
            options.setdefault("training_length", output_plots.training_lengths(metas))
        if kind in OUTPUT_PLOT_KINDS:
            return _plotter(kind)(self.frame, **options)
        return plots.comparison_summary(self.summary, **options)

    def figures(self) -> dict[str, Figure]:
        """Every comparison figure with data, by kind."""
        return {kind: self.plot(kind) for kind in self.plot_kinds()}

    def save(self, directory: str | os.PathLike[str], force: bool = False) -> Path:
        """Write ``comparison.csv``, ``summary.csv``, figures and ``report.html`` atomically.

        Same overwrite rules as :meth:`FidelityResult.save`; never into a run directory the
        comparison was read from.
        """
        with result_directory(
            directory, force, "comparison", LEGACY_COMPARISON, inputs=self.sources
        ) as staging:
            write_table(self.frame, staging / "comparison.csv")
            write_table(self.summary, staging / "summary.csv")
            images = _write_figures(self.figures(), staging)
            from fidelity.reports import html

            report = html.render_comparison(self, images)
            (staging / "report.html").write_text(report, encoding="utf-8")
        return Path(directory)

    def _repr_html_(self) -> str:
        from fidelity.reports import html

        return html.render_comparison_fragment(self)
