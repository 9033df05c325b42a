"""Figures for fidelity results; every public function returns a :class:`matplotlib.figure.Figure`.

Figures are built as bare ``Figure`` objects (never through ``pyplot``), so nothing touches the
global figure manager: they render headless (Agg, via ``fig.savefig``) and display in notebooks
alike, and they are garbage-collected like any other object.

All functions take the tidy ``frame`` of a result (columns ``model, checkpoint, metric, layer,
source_layer, distance, value, ci_low, ci_high, n, length, depth``; see
:mod:`fidelity.results`); the comparison functions take the same frame with a leading ``run``
column. Colours: Okabe-Ito for categories (metrics, runs), cividis for ordered layers; both are
colour-blind safe.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, NullLocator

from fidelity.reports.labels import format_token_count

OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow (last: weak contrast on white)
)
"""Colour-blind-safe categorical palette (Okabe & Ito 2008), strongest colours first."""

LINE_STYLES = ("-", "--", "-.", ":")
"""Cycled after the palette runs out, so more than 8 runs stay distinguishable."""

LAYER_COLORMAP = "cividis"
"""Sequential, colour-blind-safe map for ordered layers and for heatmap scores."""

MAX_CURVES = 9
"""Layers drawn by default in one panel; more are subsampled evenly (pass ``layers=``)."""

MAX_PANELS = 12
"""Layer panels drawn by default in a comparison grid."""

MEMORY_THRESHOLD = 0.5
"""Normalized score that counts as remembered (the effective-memory-length threshold)."""

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "figure.titlesize": 12,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

_DISTANCE_LABEL = "distance (tokens)"
_NORMALIZED_ETMF_LABEL = "normalized ETMF (1 = perfect, 0 = chance)"
_RETRIEVAL_TITLES = {"passkey_acc": "passkey retrieval", "kv_acc": "key-value retrieval"}


# ----------------------------------------------------------------------------- formatting


def _count_ticks(value: float, _position: object = None) -> str:
    return format_token_count(value)


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_MATHTEXT_LABEL = re.compile(r"\$\\mathdefault\{(.*)\}\$")


class PlainLogFormatter(LogFormatterSciNotation):
    """Matplotlib's log-axis labels (``10^-3``, ``2 x 10^-3``, ``0.5``) as plain text with
    Unicode superscripts (``10⁻³``, ``2×10⁻³``): the same ticks and numbers, but nothing for
    mathtext to parse (which took a tenth of the time of writing a figure with log ticks)."""

    def __call__(self, x: float, pos: object = None) -> str:
        label = super().__call__(x, pos)
        match = _MATHTEXT_LABEL.fullmatch(label)
        if match is None:
            return label
        text = match.group(1).replace(r"\times", "×")
        text = re.sub(r"\^\{(-?\d+)\}", lambda power: power.group(1).translate(_SUPERSCRIPT), text)
        return "\N{MINUS SIGN}" + text[1:] if text.startswith("-") else text


def _plain_log_labels(axis: Axis) -> None:
    """Label a log ``axis`` with :class:`PlainLogFormatter` (major and minor ticks, as the log
    scale's own formatters do)."""
    base = axis.get_transform().base
    axis.set_major_formatter(PlainLogFormatter(base))
    axis.set_minor_formatter(PlainLogFormatter(base, labelOnlyBase=False))


def default_title(frame: pd.DataFrame, what: str) -> str:
    """``"<what> — <model> @ <checkpoint>, length <n>"`` from the frame's identifying columns."""
    models = sorted(set(frame["model"])) if "model" in frame else []
    parts = [what]
    if len(models) == 1:
        name = models[0]
        checkpoints = sorted(set(frame["checkpoint"]))
        if len(checkpoints) == 1 and checkpoints[0]:
            name += f" @ {checkpoints[0].rstrip('/').rsplit('/', 1)[-1]}"
        parts.append(name)
    horizontal = frame[frame["layer"] >= 0] if "layer" in frame else frame
    lengths = sorted(set(horizontal["length"])) if "length" in horizontal else []
    if len(lengths) == 1:
        parts.append(f"length {format_token_count(lengths[0])}")
    return parts[0] if len(parts) == 1 else f"{parts[0]} — {', '.join(parts[1:])}"


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _style() -> Iterator[None]:
    """Apply legible defaults while artists are created (rcParams restored afterwards)."""
    with mpl.rc_context(_STYLE):
        yield


class NotebookFigure(Figure):
    """A plain Figure that also shows itself in Jupyter without pyplot (``_repr_png_``)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    return NotebookFigure(figsize=(width, height), layout="constrained")


def _rows(frame: pd.DataFrame, metrics: Sequence[str], what: str) -> pd.DataFrame:
    """Rows of ``frame`` for ``metrics``; ValueError naming the metrics it holds when none."""
    missing = [c for c in ("metric", "layer", "distance", "value") if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing columns {missing}; pass a result's tidy frame")
    rows = frame[frame["metric"].isin(list(metrics))]
    if rows.empty:
        held = ", ".join(sorted(set(frame["metric"]))) or "none"
        raise ValueError(
            f"no rows to plot {what}: needs metric {' or '.join(map(repr, metrics))}; "
            f"the frame holds metrics: {held}"
        )
    return rows


def _single_run(rows: pd.DataFrame, what: str) -> None:
    runs = rows[["model", "checkpoint"]].drop_duplicates()
    if len(runs) > 1:
        names = ", ".join(f"{m}@{c}" if c else m for m, c in runs.itertuples(index=False))
        raise ValueError(
            f"{what} draws one run, but the frame holds {len(runs)} ({names}); "
            "use the comparison plots (fidelity.Comparison) for several runs"
        )


def _unique_curve(rows: pd.DataFrame, keys: list[str], what: str) -> pd.DataFrame:
    duplicated = rows.duplicated(keys, keep=False)
    if duplicated.any():
        example = rows.loc[duplicated, keys].iloc[0].to_dict()
        raise ValueError(
            f"{what}: several rows share {keys} (e.g. {example}); filter the frame to one "
            "measurement per point (for instance one length) first"
        )
    return rows.sort_values(keys)


def _choose(available: Sequence[int], requested: Sequence[int] | None, limit: int) -> list[int]:
    """``requested`` checked against ``available``, or up to ``limit`` evenly spaced entries."""
    available = sorted(int(a) for a in available)
    if requested is not None:
        unknown = sorted(set(requested) - set(available))
        if unknown:
            raise ValueError(f"layers {unknown} have no rows; available layers: {available}")
        return sorted(set(int(r) for r in requested))
    if len(available) <= limit:
        return available
    picks = np.unique(np.round(np.linspace(0, len(available) - 1, limit)).astype(int))
    return [available[i] for i in picks]


def _layer_colors(layers: Sequence[int]) -> dict[int, tuple[float, ...]]:
    cmap = mpl.colormaps[LAYER_COLORMAP]
    if len(layers) == 1:
        return {layers[0]: cmap(0.0)}
    return {layer: cmap(0.85 * i / (len(layers) - 1)) for i, layer in enumerate(layers)}


def _run_style(index: int) -> dict[str, object]:
    return {
        "color": OKABE_ITO[index % len(OKABE_ITO)],
        "linestyle": LINE_STYLES[(index // len(OKABE_ITO)) % len(LINE_STYLES)],
    }


def _plot_with_band(
    ax: Axes, curve: pd.DataFrame, x: str, label: str, floor: float = -math.inf, **style: object
) -> None:
    """One line (``value`` vs ``x``) with its confidence band where ``ci_low/high`` are finite.

    ``floor``: lowest band edge drawn (log axes cannot show bands reaching zero or below).
    """
    ax.plot(curve[x], curve["value"], marker="o", markersize=3, label=label, **style)
    if {"ci_low", "ci_high"} <= set(curve.columns):
        band = curve[np.isfinite(curve["ci_low"]) & np.isfinite(curve["ci_high"])]
        if not band.empty:
            low = band["ci_low"].clip(lower=floor)
            ax.fill_between(band[x], low, band["ci_high"], color=style.get("color"), alpha=0.18)


def _symlog_distance_axis(ax: Axes, max_distance: float) -> None:
    """Log-like distance axis that still shows distance 0 (linear between 0 and 1)."""
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    ax.set_xlim(-0.15, max(max_distance, 1) * 1.4)
    ax.xaxis.set_major_formatter(FuncFormatter(_count_ticks))
    ax.set_xlabel(_DISTANCE_LABEL)


def _reference_lines(ax: Axes, threshold: float) -> None:
    ax.axhline(0.0, color="0.35", linewidth=1.0, linestyle=":", label="chance (0)")
    ax.axhline(
        threshold,
        color="0.55",
        linewidth=1.0,
        linestyle="--",
        label=f"memory threshold ({threshold:g})",
    )


def _subsample_note(shown: int, total: int) -> str | None:
    """Legend title saying that layers were subsampled (None when all are drawn)."""
    if shown == total:
        return None
    return f"{shown} of {total} layers shown\n(pass layers=[...] for others)"


# ----------------------------------------------------------------------------- one run


def forgetting_curve(
    frame: pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    metric: str = "etmf_norm",
    threshold: float = MEMORY_THRESHOLD,
    title: str | None = None,
) -> Figure:
    """Normalized ETMF against distance, one line per layer with its confidence band.

    ``frame``: a result's tidy frame (one run). The x axis is symmetric-log so distance 0 (the
    token itself) sits at the left edge and 1, 10, 100, ... are evenly spaced; dotted line at
    chance (0), dashed at ``threshold`` (the effective-memory-length criterion). ``layers``
    defaults to all layers, evenly subsampled to at most :data:`MAX_CURVES`.
    """
    rows = _rows(frame, [metric], "the forgetting curve")
    _single_run(rows, "the forgetting curve")
    rows = rows[rows["layer"] >= 0]
    available = sorted(set(rows["layer"]))
    chosen = _choose(available, layers, MAX_CURVES)
    colors = _layer_colors(chosen)
    with _style():
        fig = _new_figure(7.5, 4.5)
        ax = fig.add_subplot()
        for layer in chosen:
            curve = _unique_curve(rows[rows["layer"] == layer], ["distance"], "forgetting curve")
            name = "layer 0 (embeddings)" if layer == 0 else f"layer {layer}"
            _plot_with_band(ax, curve, "distance", name, color=colors[layer], linewidth=1.6)
        _reference_lines(ax, threshold)
        _symlog_distance_axis(ax, float(rows["distance"].max()))
        ax.set_ylabel(_NORMALIZED_ETMF_LABEL if metric == "etmf_norm" else metric)
        ax.set_title(title or default_title(rows, "Forgetting curve"))
        fig.legend(loc="outside right upper", title=_subsample_note(len(chosen), len(available)))
    return fig


def depth_curve(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Vertical fidelity against target layer, in two panels sharing the y axis.

    Left: how much of the token embedding (source layer 0) each layer still holds; right:
    transfer between adjacent layers (source ``l - 1`` to target ``l``). Lines: normalized
    ECLMF with its band (0 = chance) and linear CKA (read-out free, 1 = same geometry).
    """
    rows = _rows(frame, ["eclmf_norm", "cka"], "the depth curve")
    _single_run(rows, "the depth curve")
    panels = (
        ("from the embeddings (source layer 0)", rows["source_layer"] == 0),
        ("adjacent layers (layer l − 1 → l)", rows["distance"] == 1),
    )
    lines = (("eclmf_norm", "ECLMF (normalized)", OKABE_ITO[0]), ("cka", "CKA", OKABE_ITO[1]))
    with _style():
        fig = _new_figure(9.0, 4.0)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (panel_title, selected) in zip(axes, panels, strict=True):
            for metric, label, color in lines:
                curve = rows[selected & (rows["metric"] == metric)]
                if not curve.empty:
                    curve = _unique_curve(curve, ["layer"], "depth curve")
                    _plot_with_band(ax, curve, "layer", label, color=color, linewidth=1.6)
            ax.axhline(0.0, color="0.35", linewidth=1.0, linestyle=":")
            ax.set_title(panel_title)
            ax.set_xlabel("target layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel("score (1 = fully preserved)")
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper")
        fig.suptitle(title or default_title(rows, "Depth curve"))
    return fig


def forgetting_heatmap(
    frame: pd.DataFrame, *, metric: str = "etmf_norm", title: str | None = None
) -> Figure:
    """Layer x distance grid of normalized ETMF (cividis, 0 = chance .. 1 = perfect).

    Distances are equal-width columns labelled with their token count; layer 0 (embeddings)
    is the bottom row; cells without a measurement are left blank.
    """
    rows = _rows(frame, [metric], "the heatmap")
    _single_run(rows, "the heatmap")
    rows = _unique_curve(rows[rows["layer"] >= 0], ["layer", "distance"], "heatmap")
    grid = rows.pivot(index="layer", columns="distance", values="value")  # (n_layer, n_dist)
    with _style():
        fig = _new_figure(max(6.0, 0.45 * grid.shape[1] + 2.5), max(3.6, 0.3 * grid.shape[0] + 1.8))
        ax = fig.add_subplot()
        ax.grid(False)
        mesh = ax.pcolormesh(
            np.ma.masked_invalid(grid.to_numpy(dtype=float)),
            cmap=LAYER_COLORMAP,
            vmin=0.0,
            vmax=1.0,
        )
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5)
        crowded = grid.shape[1] > 10
        ax.set_xticklabels(
            [format_token_count(d) for d in grid.columns],
            rotation=45 if crowded else 0,
            ha="right" if crowded else "center",
        )
        ax.set_yticks(np.arange(grid.shape[0]) + 0.5)
        ax.set_yticklabels([str(layer) for layer in grid.index])
        ax.set_xlabel(_DISTANCE_LABEL)
        ax.set_ylabel("layer (0 = embeddings)")
        ax.set_title(title or default_title(rows, "Normalized ETMF"))
        bar = fig.colorbar(mesh, ax=ax, extend="min")
        bar.set_label("normalized ETMF\n(0 = chance, 1 = perfect)")
    return fig


def _per_layer_curves(
    frame: pd.DataFrame,
    metric: str,
    what: str,
    layers: Sequence[int] | None,
    title: str,
    ylabel: str,
    log_x: bool,
) -> Figure:
    rows = _rows(frame, [metric], what)
    _single_run(rows, what)
    if log_x:
        rows = rows[(rows["distance"] > 0) & (rows["value"] > 0)]
        if rows.empty:
            raise ValueError(
                f"{what}: no positive values at positive distances to draw on log axes"
            )
    available = sorted(set(rows["layer"]))
    chosen = _choose(available, layers, MAX_CURVES)
    colors = _layer_colors(chosen)
    log_y = bool((rows["value"] > 0).all())
    floor = 0.5 * float(rows["value"].min()) if log_y else -math.inf
    with _style():
        fig = _new_figure(7.5, 4.5)
        ax = fig.add_subplot()
        for layer in chosen:
            curve = _unique_curve(rows[rows["layer"] == layer], ["distance"], what)
            _plot_with_band(
                ax, curve, "distance", f"layer {layer}", floor, color=colors[layer], linewidth=1.6
            )
        if log_x:
            ax.set_xscale("log")
            ax.set_xlabel(_DISTANCE_LABEL)
            ax.xaxis.set_major_formatter(FuncFormatter(_count_ticks))
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            _symlog_distance_axis(ax, float(rows["distance"].max()))
        if log_y:
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.legend(loc="outside right upper", title=_subsample_note(len(chosen), len(available)))
    return fig


def decay_curves(
    frame: pd.DataFrame, *, layers: Sequence[int] | None = None, title: str | None = None
) -> Figure:
    """Analytic SSM decay (``ssm_decay``) against distance on log-log axes, one line per layer.

    Distance 0 and non-positive weights cannot sit on log axes and are left out. A straight
    line bending down means exponential forgetting; a straight line means a power law.
    """
    return _per_layer_curves(
        frame,
        "ssm_decay",
        "the SSM decay plot",
        layers,
        title or default_title(frame, "SSM decay"),
        "SSM weight of token t at t + d (mean over channels)",
        log_x=True,
    )


def influence_curves(
    frame: pd.DataFrame, *, layers: Sequence[int] | None = None, title: str | None = None
) -> Figure:
    """Perturbation influence against distance, one line per layer (1 = response at the token).

    Symmetric-log distance axis (distance 0 shown); log y axis when every value is positive.
    """
    return _per_layer_curves(
        frame,
        "influence",
        "the influence plot",
        layers,
        title or default_title(frame, "Influence of a replaced token"),
        "response at t + d relative to d = 0",
        log_x=False,
    )


def _retrieval_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Trials pooled per (context length, needle depth): n-weighted mean accuracy."""
    rows = rows.assign(
        depth_key=rows["depth"].fillna(-1.0), weighted=rows["value"] * rows["n"].clip(lower=1)
    )
    grouped = rows.groupby(["depth_key", "length"], sort=True)
    totals = grouped[["weighted"]].sum().join(grouped["n"].sum().clip(lower=1))
    return (totals["weighted"] / totals["n"]).unstack("length")  # (n_depth, n_length)


def retrieval_grid(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Retrieval accuracy as a context length x needle depth grid, one panel per task.

    Cells are coloured by accuracy (cividis, 0 .. 1) and annotated with the accuracy in
    percent; rows are needle depths (0% = start of the context), columns context lengths.
    Several rows for one cell are pooled, weighted by their trial counts ``n``.
    """
    rows = _rows(frame, list(_RETRIEVAL_TITLES), "the retrieval grid")
    _single_run(rows, "the retrieval grid")
    metrics = [m for m in _RETRIEVAL_TITLES if (rows["metric"] == m).any()]
    cells = {m: _retrieval_cells(rows[rows["metric"] == m]) for m in metrics}
    widest = max(c.shape[1] for c in cells.values())
    tallest = max(c.shape[0] for c in cells.values())
    with _style():
        fig = _new_figure(max(4.5, 0.9 * widest + 2.0) * len(metrics) + 1.0, 0.5 * tallest + 2.2)
        axes = np.atleast_1d(fig.subplots(1, len(metrics)))
        mesh = None
        for ax, metric in zip(axes, metrics, strict=True):
            grid = cells[metric]
            values = grid.to_numpy(dtype=float)
            ax.grid(False)
            mesh = ax.pcolormesh(
                np.ma.masked_invalid(values), cmap=LAYER_COLORMAP, vmin=0.0, vmax=1.0
            )
            for (i, j), value in np.ndenumerate(values):
                if np.isfinite(value):
                    ax.text(
                        j + 0.5,
                        i + 0.5,
                        f"{100 * value:.0f}%",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if value > 0.6 else "white",
                    )
            ax.set_xticks(np.arange(grid.shape[1]) + 0.5)
            ax.set_xticklabels([format_token_count(n) for n in grid.columns])
            ax.set_yticks(np.arange(grid.shape[0]) + 0.5)
            ax.set_yticklabels(["all" if d < 0 else f"{100 * d:.0f}%" for d in grid.index])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth (0% = start of context)")
            ax.invert_yaxis()
            ax.set_title(_RETRIEVAL_TITLES[metric])
        bar = fig.colorbar(mesh, ax=list(axes))
        bar.set_label("accuracy")
        fig.suptitle(title or default_title(rows, "Retrieval"))
    return fig


# ----------------------------------------------------------------------------- several runs


def _runs(frame: pd.DataFrame) -> list[str]:
    if "run" not in frame.columns:
        raise ValueError("comparison plots need a 'run' column (use Comparison.frame)")
    return list(dict.fromkeys(frame["run"]))


def comparison_overlay(
    frame: pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    metric: str = "etmf_norm",
    threshold: float = MEMORY_THRESHOLD,
    title: str | None = None,
) -> Figure:
    """Forgetting curves of several runs overlaid, one panel per layer, one colour per run.

    ``frame``: a comparison frame (tidy rows plus a ``run`` column). Panels share both axes;
    ``layers`` defaults to the layers any run has, evenly subsampled to :data:`MAX_PANELS`.
    """
    runs = _runs(frame)
    rows = _rows(frame, [metric], "the comparison overlay")
    rows = rows[rows["layer"] >= 0]
    available = sorted(set(rows["layer"]))
    chosen = _choose(available, layers, MAX_PANELS)
    n_cols = min(4, len(chosen))
    n_rows = math.ceil(len(chosen) / n_cols)
    with _style():
        fig = _new_figure(3.2 * n_cols + 1.8, 2.6 * n_rows + 0.8)
        axes = np.atleast_1d(fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False))
        for ax, layer in zip(axes.flat, chosen, strict=False):
            for index, run in enumerate(runs):
                curve = rows[(rows["run"] == run) & (rows["layer"] == layer)]
                if not curve.empty:
                    curve = _unique_curve(curve, ["distance"], "comparison overlay")
                    _plot_with_band(ax, curve, "distance", run, linewidth=1.5, **_run_style(index))
            ax.axhline(0.0, color="0.35", linewidth=1.0, linestyle=":")
            ax.axhline(threshold, color="0.55", linewidth=1.0, linestyle="--")
            ax.set_title("layer 0 (embeddings)" if layer == 0 else f"layer {layer}")
        for ax in axes.flat[len(chosen) :]:
            ax.set_visible(False)
        _symlog_distance_axis(axes.flat[0], float(rows["distance"].max()))
        axes.flat[0].set_xlabel("")
        for column in axes.T:
            lowest = [ax for ax in column if ax.get_visible()][-1]
            lowest.set_xlabel(_DISTANCE_LABEL)
            lowest.xaxis.set_tick_params(labelbottom=True)
        for row in axes:
            row[0].set_ylabel("normalized ETMF" if metric == "etmf_norm" else metric)
        handles, labels = _legend_entries(axes.flat)
        fig.legend(handles, labels, loc="outside right upper", title="run")
        heading = title or "Forgetting curves by layer (dotted: chance, dashed: 0.5)"
        note = _subsample_note(len(chosen), len(available))
        fig.suptitle(f"{heading}\n{note.replace(chr(10), ' ')}" if note else heading)
    return fig


def _legend_entries(axes: object) -> tuple[list[object], list[str]]:
    """Unique legend handles across panels, first occurrence kept."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def comparison_depth(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Depth curves of several runs side by side: three panels, one colour per run.

    Panels: normalized ECLMF from the embeddings (source layer 0), CKA from the embeddings,
    and normalized ECLMF between adjacent layers; x is the target layer.
    """
    runs = _runs(frame)
    rows = _rows(frame, ["eclmf_norm", "cka"], "the comparison depth plot")
    panels = (
        ("ECLMF (normalized) from embeddings", "eclmf_norm", rows["source_layer"] == 0),
        ("CKA from embeddings", "cka", rows["source_layer"] == 0),
        ("ECLMF (normalized), adjacent layers", "eclmf_norm", rows["distance"] == 1),
    )
    with _style():
        fig = _new_figure(12.0, 3.8)
        axes = fig.subplots(1, len(panels), sharey=True)
        for ax, (panel_title, metric, selected) in zip(axes, panels, strict=True):
            for index, run in enumerate(runs):
                curve = rows[selected & (rows["metric"] == metric) & (rows["run"] == run)]
                if not curve.empty:
                    curve = _unique_curve(curve, ["layer"], "comparison depth plot")
                    _plot_with_band(ax, curve, "layer", run, linewidth=1.5, **_run_style(index))
            ax.axhline(0.0, color="0.35", linewidth=1.0, linestyle=":")
            ax.set_title(panel_title)
            ax.set_xlabel("target layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel("score (1 = fully preserved)")
        handles, labels = _legend_entries(axes)
        fig.legend(handles, labels, loc="outside right upper", title="run")
        fig.suptitle(title or "Depth curves")
    return fig


def _spread_scale(ax: Axes, values: np.ndarray) -> None:
    """Log y axis when positive values span more than 10x (symlog when zeros occur too)."""
    positive = values[values > 0]
    if positive.size < 2 or positive.max() <= 10 * positive.min() or (values < 0).any():
        return
    if positive.size == values.size:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    else:
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.5)
        ax.yaxis.set_major_formatter(FuncFormatter(_count_ticks))


SUMMARY_PANELS = (
    ("farthest_distance", "farthest distance (tokens)", "largest distance with score ≥ 0.5"),
    ("peak_distance", "peak distance (tokens)", "distance > 0 with the highest score"),
    ("memory_mass", "memory mass (doublings)", "area under the score over log2-distance"),
    ("half_life", "half-life (tokens)", "half-life (decaying curves only)"),
)
"""Panels of :func:`comparison_summary`: (column, y label, title)."""


def comparison_summary(summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Farthest distance, peak distance, memory mass and half-life by layer, one line per run
    with interval bars.

    ``summary``: a comparison summary (``run``, ``layer`` and, for each panel's statistic in
    :data:`SUMMARY_PANELS`, the value and its ``_low`` / ``_high`` bounds). Log y axes when
    every plotted value is positive and they span more than 10x (memory spans often differ by
    orders of magnitude). A half-life is missing where a curve is not an exponential decay.
    """
    needed = ["run", "layer"]
    needed += [f"{c}{end}" for c, _, _ in SUMMARY_PANELS for end in ("", "_low", "_high")]
    missing = [c for c in needed if c not in summary.columns]
    if missing:
        raise ValueError(f"summary is missing columns {missing}; pass Comparison.summary")
    if summary.empty:
        raise ValueError("no rows to plot the summary: the comparison summary is empty")
    runs = list(dict.fromkeys(summary["run"]))
    dodge = 0.25 / max(len(runs) - 1, 1)  # runs side by side within a layer
    with _style():
        fig = _new_figure(10.0, 7.0)
        axes = fig.subplots(2, 2, sharex=True).ravel()
        for ax, (column, ylabel, panel_title) in zip(axes, SUMMARY_PANELS, strict=True):
            for index, run in enumerate(runs):
                part = summary[summary["run"] == run].sort_values("layer")
                value = part[column].to_numpy(dtype=float)
                low = part[f"{column}_low"].to_numpy(dtype=float)
                high = part[f"{column}_high"].to_numpy(dtype=float)
                error = np.vstack([value - low, high - value])  # (2, n_layer)
                error = np.where(np.isfinite(error), np.clip(error, 0, None), 0.0)
                ax.errorbar(
                    part["layer"] + dodge * (index - (len(runs) - 1) / 2),
                    value,
                    yerr=error,
                    marker="o",
                    markersize=4,
                    capsize=3,
                    linewidth=1.5,
                    label=run,
                    **_run_style(index),
                )
            finite = summary[column].to_numpy(dtype=float)
            finite = finite[np.isfinite(finite)]
            _spread_scale(ax, finite)
            if not finite.size:
                ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_title(panel_title)
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles, labels = _legend_entries(axes[:1])
        fig.legend(handles, labels, loc="outside right upper", title="run")
        fig.suptitle(title or "Where each layer holds memory")
    return fig
