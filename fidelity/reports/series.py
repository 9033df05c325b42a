"""Figure and HTML report of a checkpoint series (:class:`fidelity.series.Series`)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.figure import Figure

from fidelity.reports.html import _page, figure_png, format_number

if TYPE_CHECKING:
    from fidelity.series import Series

_PANELS = (
    ("half_life", "ETMF half-life (tokens)"),
    ("contiguous_length", "contiguous length (tokens)"),
    ("memory_mass", "memory mass (doublings)"),
)
SERIES_CAPTION = (
    "Against the training step: task accuracy at the analysis length (Wilson 95% interval; "
    "only for a memory-task probe), then per layer the normalized ETMF curve's half-life "
    "(only where the curve is an exponential decay), contiguous length (ETMF >= 0.5 at every "
    "distance up to it; the 'effective memory length') and memory mass (area under the curve "
    "over log2 distance), each with its 95% bootstrap interval."
)


def series_figure(
    table: pd.DataFrame, layers: Sequence[int] | None = None, title: str | None = None
) -> Figure:
    """Panels against ``step`` from a series table (columns ``step``, ``layer``, the summary
    statistics with ``_low``/``_high``, ``accuracy`` with ``accuracy_low``/``_high``): accuracy
    (when any is measured), then one line per layer (layer 0, the embeddings, left out unless
    named in ``layers``) for half-life, contiguous length and memory mass."""
    chosen = sorted(set(table["layer"]) - {0}) if layers is None else list(layers)
    with_accuracy = table["accuracy"].notna().any()
    panels = (1 if with_accuracy else 0) + len(_PANELS)
    figure = Figure(figsize=(3.3 * panels, 3.2), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if with_accuracy:
        per_step = table.drop_duplicates("step").sort_values("step")
        axis = axes[0]
        axis.plot(per_step["step"], per_step["accuracy"], marker="o", color="black")
        axis.fill_between(
            per_step["step"], per_step["accuracy_low"], per_step["accuracy_high"], alpha=0.2
        )
        axis.set(xlabel="training step", ylabel="task accuracy", ylim=(-0.02, 1.02))
        axis.set_title("accuracy", fontsize=10)
        axes = axes[1:]
    for axis, (column, label) in zip(axes, _PANELS, strict=True):
        for layer in chosen:
            rows = table[table["layer"] == layer].sort_values("step")
            if rows.empty:
                continue
            (line,) = axis.plot(rows["step"], rows[column], marker="o", label=f"layer {layer}")
            axis.fill_between(
                rows["step"],
                rows[f"{column}_low"],
                rows[f"{column}_high"],
                alpha=0.15,
                color=line.get_color(),
            )
        axis.set(xlabel="training step", ylabel=label)
        axis.set_title(label.split(" (")[0], fontsize=10)
    if chosen:
        axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def _table_html(series: Series) -> str:
    columns = [
        ("step", "step"),
        ("layer", "layer"),
        ("accuracy", "accuracy"),
        ("half_life", "half-life"),
        ("contiguous_length", "contiguous"),
        ("farthest_distance", "farthest"),
        ("memory_mass", "mass"),
    ]
    table = series.table
    if table["accuracy"].isna().all():
        columns.remove(("accuracy", "accuracy"))
    head = "".join(f"<th>{escape(name)}</th>" for _, name in columns)
    body = []
    for _, row in table.iterrows():
        cells = []
        for column, _name in columns:
            value = row[column]
            text = format_number(value) if value == value else "–"
            if column not in ("step", "layer") and f"{column}_low" in row and value == value:
                low, high = row[f"{column}_low"], row[f"{column}_high"]
                if low == low and high == high:
                    text += f" [{format_number(low)}, {format_number(high)}]"
            cells.append(f"<td>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _sources_html(series: Series) -> str:
    items = "".join(
        f"<li>step {step}: {escape(str(result.meta.get('checkpoint_path') or '–'))}</li>"
        for step, result in zip(series.steps, series.results, strict=True)
    )
    return f"<details><summary>checkpoints</summary><ul>{items}</ul></details>"


def render_series_fragment(series: Series, png: bytes | None = None) -> str:
    """The series' figure and table as an HTML fragment (notebooks)."""
    png = png if png is not None else figure_png(series.plot())
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<h2>{escape(series.label)}: memory across training</h2>"
        f'<figure><img src="data:image/png;base64,{data}" alt="series">'
        f"<figcaption>{escape(SERIES_CAPTION)}</figcaption></figure>"
        f"{_table_html(series)}{_sources_html(series)}"
    )


def render_series(series: Series, png: bytes) -> str:
    """A self-contained HTML page for a saved series."""
    return _page(f"{series.label}: memory across training", render_series_fragment(series, png))
