"""MemMamba's memory in words and tables, from a result's ``memmamba_*`` rows (see
:mod:`fidelity.metrics.memmamba_memory`): one table per layer and one sentence on the loss,
shared by the HTML report and the command-line summary. A result without those rows (another
model, or the metric not run) gives nothing."""

from __future__ import annotations

import math
from html import escape

import pandas as pd

HEADERS = (
    "layer",
    "writes",
    "fires",
    "note age: mean",
    "median",
    "oldest",
    "notes in pool",
    "context share",
)
"""Columns of :func:`memory_cells`' rows."""
CAPTION = (
    "writes: share of positions where the layer's block writes a note to its pool; fires: share "
    "of positions where its cross-token attention reads the pool (- = none in this block); note "
    "age: tokens between a sampled position (the run's anchors) and the writing of the notes "
    "its pool holds there: the mean and the oldest note's age averaged over anchors, the median "
    "over every (anchor, note) pair; notes in pool: how many the pool holds at the anchors (out "
    "of pool_size); context share: size of the memory contexts the block adds to the residual "
    "stream, relative to the stream (mean over positions of ||context|| / ||h||). [95% "
    "bootstrap interval over blocks of 128 positions or over anchors]."
)
_RATE, _FIRE = "memmamba_write_rate", "memmamba_fire_rate"
_AGE, _MEDIAN, _OLDEST = "memmamba_note_age", "memmamba_note_age_median", "memmamba_note_age_oldest"
_FILL, _SHARE = "memmamba_pool_fill", "memmamba_context_share"
_FULL, _ZEROED, _DELTA = "memmamba_loss_full", "memmamba_loss_zeroed", "memmamba_loss_delta"


def _interval(row: pd.Series | None, number, scale: float = 1.0) -> str:
    """``value [low, high]`` of a frame row with ``number`` formatting; ``-`` for none."""
    if row is None or not math.isfinite(row["value"]):
        return "-"
    text = number(row["value"] * scale)
    if math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
        text += f" [{number(row['ci_low'] * scale)}, {number(row['ci_high'] * scale)}]"
    return text


def _percent(value: float) -> str:
    return f"{value:.1f}%" if value >= 0.1 or value == 0 else f"{value:.2g}%"


def _tokens(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def memory_cells(frame: pd.DataFrame) -> list[list[str]]:
    """One row of cells (:data:`HEADERS`) per layer holding ``memmamba_*`` rows, by layer."""
    rows = frame[frame["metric"].str.startswith("memmamba_") & (frame["layer"] >= 0)]
    table = []
    for layer, group in rows.groupby("layer", sort=True):
        by_metric = {metric: row for metric, row in group.set_index("metric").iterrows()}
        table.append(
            [
                str(int(layer)),
                _interval(by_metric.get(_RATE), _percent, 100),
                _interval(by_metric.get(_FIRE), _percent, 100),
                _interval(by_metric.get(_AGE), _tokens),
                _interval(by_metric.get(_MEDIAN), _tokens),
                _interval(by_metric.get(_OLDEST), _tokens),
                _interval(by_metric.get(_FILL), "{:.1f}".format),
                _interval(by_metric.get(_SHARE), _percent, 100),
            ]
        )
    return table


def loss_sentence(frame: pd.DataFrame) -> str | None:
    """What zeroing every pool context does to the loss, in one sentence (None without it)."""
    rows = frame[frame["metric"].isin((_FULL, _ZEROED, _DELTA))].set_index("metric")
    if len(rows) < 3:
        return None
    full, zeroed, delta = rows.loc[_FULL], rows.loc[_ZEROED], rows.loc[_DELTA]
    relative = delta["value"] / full["value"] * 100 if full["value"] else math.nan
    return (
        f"Memory path: text loss over the first {int(full['length'])} tokens is "
        f"{full['value']:.4f} nats with the full model and {zeroed['value']:.4f} with every pool "
        f"context zeroed: {delta['value']:+.4f} nats "
        f"[{delta['ci_low']:+.4f}, {delta['ci_high']:+.4f}] ({relative:+.2f}%; positive: the "
        "memory path lowers the loss)."
    )


def memory_panel(frame: pd.DataFrame) -> str:
    """The HTML section of a report: heading, per-layer table, loss sentence, caption; an
    empty string for a result without ``memmamba_*`` rows."""
    cells = memory_cells(frame)
    sentence = loss_sentence(frame)
    if not cells and sentence is None:
        return ""
    parts = ["<h2 id='memmamba-memory'>MemMamba memory by layer</h2>"]
    if sentence is not None:
        parts.append(f"<p>{escape(sentence)}</p>")
    if cells:
        parts.append("<table class='memmamba-memory'><thead><tr>")
        parts += [f"<th>{escape(header)}</th>" for header in HEADERS]
        parts.append("</tr></thead><tbody>")
        for row in cells:
            parts.append("<tr>" + "".join(f"<td class='num'>{escape(c)}</td>" for c in row))
            parts.append("</tr>")
        parts.append("</tbody></table>")
    parts.append(f"<p class='muted'>{escape(CAPTION)}</p>")
    return "".join(parts)
