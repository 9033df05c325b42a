"""Figures of the output-level metrics (``effrem``, ``position_loss``, ``context_probe``), for
one run or several overlaid; every function returns a :class:`matplotlib.figure.Figure`.

Each function takes a tidy frame: a result's (one run: EffRem draws one line per end ``T``)
or a comparison's, with its leading ``run`` column (one colour per run; EffRem then draws each
run's largest end). The x axes are logarithmic (token counts); position loss marks the length
the checkpoint was trained at when it is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fidelity.reports.plots import (
    LINE_STYLES,
    OKABE_ITO,
    _count_ticks,
    _new_figure,
    _plot_with_band,
    _rows,
    _run_style,
    _style,
    _unique_curve,
    default_title,
    format_token_count,
)


def _log_tokens(ax: Axes, label: str) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_count_ticks))
    ax.set_xlabel(label)


def _groups(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame, dict[str, object]]]:
    """``(label, rows, line style)`` per run of a comparison frame, or one group for a
    result's frame."""
    if "run" not in rows.columns:
        return [("", rows, {"color": OKABE_ITO[0]})]
    runs = list(dict.fromkeys(rows["run"]))
    return [(run, rows[rows["run"] == run], _run_style(i)) for i, run in enumerate(runs)]


EFFREM_LINEAR_BELOW = 1e-4
"""EffRem axes are logarithmic above this value and linear below it (so exact zeros show)."""


def effrem_curves(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Effective remembrance ``EffRem_T(t)`` with bands, in two panels sharing the y axis
    (symmetric-log: linear below :data:`EFFREM_LINEAR_BELOW`, so exact zeros show): against the
    cut ``t`` (tokens dropped from the start) and against the context kept, ``T + 1 - t``, both
    on log axes. One run: one line per end ``T``; a comparison: each run's largest end. 0 = the
    dropped tokens do not change the prediction at all."""
    rows = _rows(frame, ["effrem"], "the effective-remembrance plot")
    groups = _groups(rows)
    curves = []  # (label, rows, style)
    if len(groups) == 1 and not groups[0][0]:
        ends = sorted(set(rows["length"]))
        for end, shade in zip(ends, np.linspace(0.3, 1.0, len(ends)), strict=True):
            curve = _unique_curve(rows[rows["length"] == end], ["distance"], "EffRem")
            label = f"T + 1 = {format_token_count(end)}"
            curves.append((label, curve, {"color": OKABE_ITO[0], "alpha": shade}))
    else:
        for run, part, style in groups:
            last = part[part["length"] == part["length"].max()]
            label = f"{run} (T + 1 = {format_token_count(last['length'].iloc[0])})"
            curves.append((label, _unique_curve(last, ["distance"], "EffRem"), style))
    with _style():
        fig = _new_figure(11.0, 4.5)
        by_cut, by_kept = fig.subplots(1, 2, sharey=True)
        for label, curve, style in curves:
            curve = curve.assign(kept=curve["length"] - curve["distance"])
            _plot_with_band(by_cut, curve, "distance", label, linewidth=1.5, **style)
            _plot_with_band(by_kept, curve, "kept", label, linewidth=1.5, **style)
        _log_tokens(by_cut, "cut t (tokens dropped from the start)")
        _log_tokens(by_kept, "context kept, T + 1 − t (tokens)")
        by_cut.set_yscale("symlog", linthresh=EFFREM_LINEAR_BELOW)
        by_cut.set_ylim(bottom=0)
        by_cut.set_ylabel("EffRem = TV(full, cut context)")
        by_cut.set_title("against the cut")
        by_kept.set_title("against the context kept")
        handles, labels = by_cut.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper")
        fig.suptitle(title or default_title(rows, "Effective remembrance"))
    return fig


def _bin_centres(curve: pd.DataFrame) -> pd.DataFrame:
    """``x``: the geometric centre of each position bin (it runs to the next bin's first
    position, the last to the run's length)."""
    starts = curve["distance"].to_numpy(dtype=float)
    stops = np.append(starts[1:], float(curve["length"].iloc[-1]))
    return curve.assign(x=np.sqrt(starts * np.maximum(stops - 1, starts)))


def position_loss_curve(
    frame: pd.DataFrame,
    *,
    training_length: int | Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> Figure:
    """Loss (nats per token) against position on a log axis, binned, with bands; a vertical
    line at the training length (``training_length``: one value, or one per run of a
    comparison; None: not marked)."""
    rows = _rows(frame, ["position_loss"], "the loss-by-position plot")
    with _style():
        fig = _new_figure(7.5, 4.5)
        ax = fig.add_subplot()
        marks: dict[int, list[str]] = {}
        for run, part, style in _groups(rows):
            curve = _bin_centres(_unique_curve(part, ["distance"], "loss by position"))
            _plot_with_band(ax, curve, "x", run or "loss", linewidth=1.5, **style)
            trained = (
                training_length.get(run)
                if isinstance(training_length, Mapping)
                else training_length
            )
            if trained:
                marks.setdefault(int(trained), []).append(run)
        for index, (trained, runs) in enumerate(sorted(marks.items())):
            label = f"training length {format_token_count(trained)}"
            if len(marks) > 1:
                label += f" ({', '.join(runs)})"
            style = LINE_STYLES[index % len(LINE_STYLES)]
            ax.axvline(trained, color="0.4", linestyle=style, linewidth=1.0, label=label)
        _log_tokens(ax, "position of the predicted token")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title or default_title(rows, "Loss by position"))
        fig.legend(loc="outside right upper")
    return fig


def context_probe_curves(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Context-length probing in two panels: the targets' loss against the context length
    given (log axis), and the gain of each step (the loss difference from the previous context
    length, attributed to the tokens it adds; dotted line at 0)."""
    rows = _rows(frame, ["context_probe", "context_probe_gain"], "the context-probing plot")
    with _style():
        fig = _new_figure(10.0, 4.2)
        loss_ax, gain_ax = fig.subplots(1, 2, sharex=True)
        for run, part, style in _groups(rows):
            for ax, metric in ((loss_ax, "context_probe"), (gain_ax, "context_probe_gain")):
                curve = part[part["metric"] == metric]
                if not curve.empty:
                    curve = _unique_curve(curve, ["distance"], "context probing")
                    _plot_with_band(ax, curve, "distance", run or metric, linewidth=1.5, **style)
        for ax in (loss_ax, gain_ax):
            _log_tokens(ax, "context length c (tokens)")
        gain_ax.axhline(0.0, color="0.35", linewidth=1.0, linestyle=":")
        loss_ax.set_ylabel("loss of the target (nats)")
        loss_ax.set_title("loss with c tokens of context")
        gain_ax.set_ylabel("loss(previous c) − loss(c)")
        gain_ax.set_title("gain from the added context")
        if "run" in rows.columns:
            handles, labels = loss_ax.get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside right upper", title="run")
        fig.suptitle(title or default_title(rows, "Context-length probing"))
    return fig


def training_lengths(metas: Mapping[str, Mapping[str, object]]) -> dict[str, int | None]:
    """Each run's training length from its ``meta`` (``training_length``), None when unknown."""
    found = {}
    for run, meta in metas.items():
        value = meta.get("training_length")
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        found[run] = int(value) if ok else None
    return found
