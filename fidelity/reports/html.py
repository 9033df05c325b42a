"""Self-contained HTML reports: figures embedded as base64 PNG, inline CSS, no scripts.

A report opens offline and can be mailed as one file. Every piece of text that comes from a
result (model names, notes, meta values) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.figure import Figure

from fidelity.reports.memmamba_memory import memory_panel
from fidelity.reports.plots import format_token_count

if TYPE_CHECKING:
    from fidelity.results import Comparison, FidelityResult

EMBED_DPI = 110
"""Resolution of the PNGs embedded in reports (the saved .png files use their own)."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { padding: 0.7em 1em; border-radius: 4px; margin: 1em 0; font-weight: 600; }
.untrained { background: #fff1d6; border: 2px solid #E69F00; }
.warnings { background: #fde8e0; border: 2px solid #D55E00; font-weight: normal; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
dt { font-weight: 600; margin-top: 0.5em; }
.muted { color: #666; font-size: 0.9em; }
"""

FIGURE_CAPTIONS = {
    "forgetting": "Forgetting curves: normalized ETMF against distance, one line per layer, "
    "shaded bands are confidence intervals; dotted line = chance, dashed line = the 0.5 "
    "threshold of the farthest distance and the contiguous length.",
    "depth": "Depth curves: how much of the token embedding each layer still holds (left) "
    "and how much passes between adjacent layers (right).",
    "heatmap": "Normalized ETMF for every layer and distance (bright = remembered, "
    "dark = at chance).",
    "retrieval": "Retrieval accuracy by context length and needle depth.",
    "decay": "Analytic SSM decay: the weight with which a token still reaches a later "
    "position inside each layer (log-log axes).",
    "influence": "Influence: how much a later hidden state changes when the token is replaced, "
    "relative to the change at the token itself.",
    "effrem": "Effective remembrance: total-variation distance between the next-token "
    "distribution at T with the whole prefix and with the first t tokens dropped, against t "
    "(log axis), one line per end T; 0 = the dropped start does not matter.",
    "position_loss": "Loss by position: next-token loss (nats) of the probe's tokens, binned on "
    "a log axis of their position; dashed line: the length the checkpoint was trained at.",
    "context_probe": "Context-length probing: loss of sampled target tokens given only the last "
    "c tokens (left) and the gain from each longer context (right).",
}

COMPARISON_CAPTIONS = {
    "forgetting": "Forgetting curves of every run, one panel per layer, one colour per run "
    "(normalized ETMF against distance; dotted line = chance, dashed line = 0.5).",
    "depth": "Depth curves of every run: normalized ECLMF and CKA from the embeddings, and "
    "normalized ECLMF between adjacent layers.",
    "summary": "Farthest distance, peak distance, memory mass and half-life (decaying curves "
    "only) by layer, one line per run (bars: intervals).",
    "effrem": "Effective remembrance of every run at its largest end T, against the cut t "
    "(tokens dropped from the start, log axis).",
    "position_loss": "Loss by position of every run (log axis); dashed lines: each run's "
    "training length where its checkpoint records one.",
    "context_probe": "Context-length probing of every run: target loss against the context "
    "length given, and the gain of each longer context.",
}

HOW_TO_READ = (
    (
        "ETMF (horizontal fidelity)",
        "How well the identity of a token can still be read out of a layer's hidden state d "
        "tokens later. A linear read-out is fitted on some positions and scored on others, as "
        "the cosine between the true token embedding and the one read out.",
    ),
    (
        "ECLMF (vertical fidelity)",
        "The same idea across depth: how well one layer's representation of a token can be "
        "read out of a later layer at the same position. CKA is a read-out-free companion that "
        "compares the geometry of the two layers (1 = identical up to rotation and scale).",
    ),
    (
        "Chance",
        "The score the same read-out gets on unrelated positions: what a model with no memory "
        "of the token would still score.",
    ),
    (
        "Normalized score",
        "(score - chance) / (1 - chance): 1 means perfect recall, 0 means no better than chance. "
        "This is the headline curve.",
    ),
    (
        "Farthest distance",
        "The largest distance, in tokens, at which the normalized score is at or above 0.5, "
        "whatever happens at shorter distances: a layer that holds a token only 8 positions "
        "later has farthest distance 8. If it equals the largest distance probed it is only a "
        "lower bound.",
    ),
    (
        "Peak distance",
        "The distance beyond 0 where the normalized score is highest, with the score there. "
        "For a curve that decays it is the shortest distance probed; a later peak is where the "
        "layer keeps the token (copying at a lag, retrieval). None (–) when the highest score "
        "is below 0.1: the largest of many scores at chance is noise, not memory.",
    ),
    (
        "Memory mass",
        "The area under the normalized curve over log2 of the distance, from distance 1 to the "
        "largest probed, in doublings: a layer that remembers perfectly up to D tokens has "
        "mass log2(D), one at chance about 0. One number for the whole curve; compare it "
        "between runs probed at the same distances.",
    ),
    (
        "Contiguous length",
        "The largest distance up to which the normalized score never drops below 0.5: memory "
        "without a gap. It is 0 for a layer whose score dips at distance 1, even when it holds "
        "the token later (see farthest distance and peak).",
    ),
    (
        "Half-life",
        "From an exponential fit to the normalized curve: the distance, in tokens, over which "
        "the remembered part halves, shown with the fit's R^2. It is reported only when the "
        "curve decays like an exponential (R^2 >= 0.9, falling); otherwise the cell says "
        "'not decaying' and the other statistics describe the curve.",
    ),
    (
        "Effective remembrance (EffRem)",
        "TV(q(. | x_0..x_T), q(. | x_t..x_T)): how far the model's next-token distribution at "
        "T moves when the first t tokens are dropped (0 = not at all, 1 = completely). A model "
        "that generalizes in length relies little on the distant start: small values for "
        "small t, rising only as the cut nears T (Buitrago Ruiz and Gu 2025).",
    ),
    (
        "Loss by position",
        "Next-token loss against the token's position in one long sequence: flat past the "
        "training length for a model that generalizes, rising where it does not.",
    ),
    (
        "Context-length probing",
        "The loss of a target token given only its last c tokens, for c on a log grid; the "
        "drop from one c to the next attributes the prediction to the tokens added (Cifka and "
        "Liutkus 2023). A flat curve: the model uses no context beyond the shortest.",
    ),
    (
        "Intervals",
        "Bootstrap intervals over anchor positions (retrieval: Wilson intervals over trials).",
    ),
)


# ----------------------------------------------------------------------------- formatting


def format_number(value: object) -> str:
    """Compact, readable number: 3 significant digits, no decimals from 100, "–" for NaN."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, int | float):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "–"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if number == 0:
        return "0"
    size = abs(number)
    if 100 <= size < 1e7:
        return f"{number:.0f}"
    if 1e-4 <= size < 100:
        return f"{number:.3g}"
    return f"{number:.2e}"


def format_bytes(count: object) -> str:
    """``3221225472`` -> ``"3.00 GiB"``; anything not a number is shown as is."""
    if not isinstance(count, int | float) or isinstance(count, bool) or not math.isfinite(count):
        return format_number(count)
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


def format_seconds(seconds: object) -> str:
    """``12.5`` -> ``"12.5 s"``, ``754`` -> ``"12 min 34 s"``, ``7300`` -> ``"2 h 1 min"``."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return format_number(seconds)
    if not math.isfinite(seconds) or seconds < 60:
        return f"{format_number(seconds)} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def figure_png(figure: Figure, dpi: int = EMBED_DPI) -> bytes:
    """The figure rendered to PNG bytes (Agg, no global state)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _embedded(name: str, figure: Figure | bytes, captions: Mapping[str, str]) -> str:
    png = figure if isinstance(figure, bytes) else figure_png(figure)
    data = base64.b64encode(png).decode("ascii")
    caption = captions.get(name, name)
    return (
        f'<figure id="figure-{escape(name, quote=True)}">'
        f'<img src="data:image/png;base64,{data}" alt="{escape(caption, quote=True)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _text(value: object) -> str:
    """Escaped display text for a meta value (lists, dicts as compact JSON)."""
    if isinstance(value, list | dict):
        return escape(json.dumps(value, ensure_ascii=False))
    if value is None or value == "":
        return "–"
    return escape(format_number(value) if isinstance(value, int | float) else str(value))


# ----------------------------------------------------------------------------- tables


def _interval_cell(row: pd.Series, column: str) -> str:
    value = format_number(row[column])
    low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
    if low is None or high is None or (math.isnan(low) and math.isnan(high)):
        return value
    return f"{value} [{format_number(low)}, {format_number(high)}]"


_METRIC_NAMES = {
    "etmf_norm": "normalized ETMF",
    "etmf": "ETMF",
    "etmf_acc": "read-out accuracy",
    "etmf_raw": "raw cosine",
}


_STATISTIC_HEADERS = {
    "farthest_distance": "farthest distance ≥ 0.5 (tokens)",
    "peak_distance": "peak distance (tokens)",
    "memory_mass": "memory mass (doublings)",
    "contiguous_length": "contiguous length ≥ 0.5 (tokens)",
    "half_life": "half-life (tokens)",
}
_STATISTIC_EXTRAS = {
    "peak_distance": ("normalized ETMF at peak", "peak_value"),
    "half_life": ("half-life fit R²", "half_life_r2"),
}


def _summary_columns(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(header, column) pairs: the curve statistics (with intervals), then further columns
    such as key-distance scores (etmf_norm@64)."""
    pairs = []
    for column, header in _STATISTIC_HEADERS.items():
        pairs.append((f"{header} [interval]", column))
        if column in _STATISTIC_EXTRAS:
            pairs.append(_STATISTIC_EXTRAS[column])
    taken = {column for _, column in pairs} | {"model", "checkpoint", "layer", "run"}
    for column in summary.columns:
        if column in taken or column.startswith(tuple(_STATISTIC_HEADERS)):
            continue
        metric, _, distance = column.partition("@")
        name = _METRIC_NAMES.get(metric, metric)
        header = f"{name} at d = {distance}" if distance else column
        pairs.append((header, column))
    return pairs


def _half_life_cell(row: pd.Series) -> str:
    """The half-life with its interval; 'not decaying' when the curve has a fit but is not an
    exponential decay."""
    if math.isnan(row["half_life"]) and not math.isnan(row.get("half_life_r2", math.nan)):
        return "not decaying"
    return _interval_cell(row, "half_life")


def summary_table(summary: pd.DataFrame, with_run: bool = False) -> str:
    """HTML table of a (comparison) summary: one row per (run and) layer, escaped cells.

    A comparison summary (``with_run``) adds each statistic's difference from the first run
    with its conservative bound."""
    columns = _summary_columns(summary)
    differences = [c for c in _STATISTIC_HEADERS if f"{c}_diff" in summary.columns]
    head = (["run"] if with_run else []) + ["layer"] + [header for header, _ in columns]
    head += [f"{_STATISTIC_HEADERS[c]} − first run [bound]" for c in differences]
    lines = ["<table class='summary'><thead><tr>"]
    lines += [f"<th>{escape(h)}</th>" for h in head]
    lines.append("</tr></thead><tbody>")
    for _, row in summary.iterrows():
        run = [f"<td>{escape(str(row['run']))}</td>"] if with_run else []
        cells = [str(int(row["layer"]))]
        for _, column in columns:
            if column == "half_life":
                cells.append(escape(_half_life_cell(row)))
            elif column in _STATISTIC_HEADERS:
                cells.append(escape(_interval_cell(row, column)))
            else:
                cells.append(escape(format_number(row[column])))
        cells += [escape(_interval_cell(_diff_view(row, c), c)) for c in differences]
        numbers = "".join(f"<td class='num'>{c}</td>" for c in cells)
        lines.append(f"<tr>{''.join(run)}{numbers}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def _diff_view(row: pd.Series, column: str) -> pd.Series:
    return pd.Series(
        {
            column: row[f"{column}_diff"],
            f"{column}_low": row[f"{column}_diff_low"],
            f"{column}_high": row[f"{column}_diff_high"],
        }
    )


_META_ROWS = (
    ("model", "model", _text),
    ("checkpoint", "checkpoint", _text),
    ("preset", "preset", _text),
    ("n_parameters", "parameters", lambda v: escape(f"{v:,}") if isinstance(v, int) else _text(v)),
    ("probe", "probe", _text),
    ("length", "length (tokens)", lambda v: escape(_length_text(v))),
    ("batch", "batch", _text),
    ("seed", "seed", _text),
    ("anchors", "anchors", _text),
    ("layers", "layers", _text),
    ("distances", "distances (tokens)", _text),
    ("metrics", "metrics", _text),
    ("device", "device", _text),
    ("created", "created", _text),
    ("wall_time_s", "wall time", lambda v: escape(format_seconds(v))),
    ("peak_memory_bytes", "peak memory", lambda v: escape(format_bytes(v))),
    (
        "versions",
        "versions",
        lambda v: (
            escape(", ".join(f"{k} {x}" for k, x in v.items())) if isinstance(v, dict) else _text(v)
        ),
    ),
    ("model_config", "model config", _text),
)
_META_HIDDEN = {"trained", "random_init", "notes"}


def _length_text(length: object) -> str:
    """``60000`` -> ``"60k (60000)"``; ``2048`` -> ``"2048"``."""
    if not isinstance(length, int) or isinstance(length, bool):
        return format_number(length)
    short = format_token_count(length)
    return short if short == str(length) else f"{short} ({length})"


def _weights_text(result: FidelityResult) -> str:
    if result.untrained:
        return "<strong>untrained (random initialization)</strong>"
    if result.meta.get("trained") is True:
        return "trained"
    return "not recorded"


def _meta_table(result: FidelityResult) -> str:
    meta = result.meta
    rows = [("weights", _weights_text(result))]
    shown = {key for key, _, _ in _META_ROWS} | _META_HIDDEN
    rows += [(label, show(meta[key])) for key, label, show in _META_ROWS if key in meta]
    rows += [(key, _text(value)) for key, value in meta.items() if key not in shown]
    body = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f"<table class='meta'>{body}</table>"


def _untrained_banner(label: str) -> str:
    return (
        f"<div class='banner untrained'>Untrained weights: {escape(label)} is a random "
        "initialization. These curves describe the architecture at initialization, not what "
        "a trained model remembers.</div>"
    )


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return "<p class='muted'>No notes.</p>"
    return "<ul>" + "".join(f"<li>{escape(str(note))}</li>" for note in notes) + "</ul>"


def _how_to_read() -> str:
    items = "".join(f"<dt>{escape(t)}</dt><dd>{escape(d)}</dd>" for t, d in HOW_TO_READ)
    return f"<h2>How to read this</h2><dl>{items}</dl>"


def _figures(figures: Mapping[str, Figure | bytes], captions: Mapping[str, str]) -> str:
    if not figures:
        return "<p class='muted'>No figures: the result holds no plottable metrics.</p>"
    return "".join(_embedded(name, figure, captions) for name, figure in figures.items())


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


# ----------------------------------------------------------------------------- reports


def render_report(
    result: FidelityResult, figures: Mapping[str, Figure | bytes] | None = None
) -> str:
    """A complete, self-contained HTML page for one result.

    ``figures``: what to embed by kind, as Figures or PNG bytes (default:
    ``result.figures()``; pass already-rendered ones to avoid drawing twice). Sections: what
    was measured, summary table, figures, how to read this, notes. Untrained weights are
    announced in a banner at the top.
    """
    figures = result.figures() if figures is None else figures
    notes = result.meta.get("notes") or []
    title = f"Memory fidelity: {result.label}"
    body = [f"<h1>{escape(title)}</h1>"]
    if result.untrained:
        body.append(_untrained_banner(result.label))
    body += [
        "<h2>What was measured</h2>",
        _meta_table(result),
        "<h2>Summary by layer</h2>",
        summary_table(result.summary),
        "<p class='muted'>Full tables: results.csv and summary.csv beside this file.</p>",
        memory_panel(result.frame),
        "<h2>Figures</h2>",
        _figures(figures, FIGURE_CAPTIONS),
        _how_to_read(),
        "<h2>Notes</h2>",
        _notes(notes if isinstance(notes, list) else [notes]),
    ]
    return _page(title, "".join(body))


def render_fragment(result: FidelityResult) -> str:
    """Notebook view of a result: label, untrained banner, summary table, forgetting curve."""
    parts = [f"<h3>{escape(result.label)}</h3>"]
    if result.untrained:
        parts.append(_untrained_banner(result.label))
    parts.append(summary_table(result.summary))
    if "forgetting" in result.plot_kinds():
        parts.append(_embedded("forgetting", result.plot("forgetting"), FIGURE_CAPTIONS))
    return "<div class='fidelity-result'>" + "".join(parts) + "</div>"


def _runs_table(comparison: Comparison) -> str:
    head = ["run", "model", "checkpoint", "weights", "probe", "length", "seed", "created"]
    lines = ["<table class='runs'><tr>", *[f"<th>{h}</th>" for h in head], "</tr>"]
    for label, result in zip(comparison.labels, comparison.results, strict=True):
        meta = result.meta
        cells = [
            escape(label),
            _text(meta.get("model")),
            _text(meta.get("checkpoint")),
            _weights_text(result),
            _text(meta.get("probe")),
            _text(meta.get("length")),
            _text(meta.get("seed")),
            _text(meta.get("created")),
        ]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


def _warnings(comparison: Comparison) -> str:
    if not comparison.warnings:
        return ""
    items = "".join(f"<li>{escape(w)}</li>" for w in comparison.warnings)
    heading = "<strong>Check before comparing:</strong>"
    return f"<div class='banner warnings'>{heading}<ul>{items}</ul></div>"


_DIFFERENCE_NOTE = (
    "Differences are this run minus the first run at the same layer. Their bounds are "
    "conservative, [low − first run's high, high − first run's low]: they contain every "
    "difference of values inside the two runs' own intervals, so they are wider than a "
    "confidence interval for the difference would be."
)


def render_comparison(
    comparison: Comparison, figures: Mapping[str, Figure | bytes] | None = None
) -> str:
    """A complete, self-contained HTML page comparing several runs.

    Sections: the runs (with untrained ones marked), warnings about mismatched runs, the
    summary with differences against the first run, figures, how to read this, notes.
    ``figures`` as in :func:`render_report`.
    """
    figures = comparison.figures() if figures is None else figures
    title = f"Memory fidelity: comparison of {len(comparison.results)} runs"
    body = [f"<h1>{escape(title)}</h1>", _warnings(comparison)]
    untrained = [
        label for label, r in zip(comparison.labels, comparison.results, strict=True) if r.untrained
    ]
    if untrained:
        body.append(
            "<div class='banner untrained'>Untrained weights (random initialization): "
            f"{escape(', '.join(untrained))}.</div>"
        )
    notes = [
        f"{label}: {note}"
        for label, result in zip(comparison.labels, comparison.results, strict=True)
        for note in (result.meta.get("notes") or [])
    ]
    body += [
        "<h2>Runs</h2>",
        _runs_table(comparison),
        "<h2>Summary by run and layer</h2>",
        summary_table(comparison.summary, with_run=True),
        f"<p class='muted'>{escape(_DIFFERENCE_NOTE)}</p>",
        "<h2>Figures</h2>",
        _figures(figures, COMPARISON_CAPTIONS),
        _how_to_read(),
        "<h2>Notes</h2>",
        _notes(notes),
    ]
    return _page(title, "".join(body))


def render_comparison_fragment(comparison: Comparison) -> str:
    """Notebook view of a comparison: warnings, summary table, forgetting overlay."""
    parts = [_warnings(comparison), summary_table(comparison.summary, with_run=True)]
    if "forgetting" in comparison.plot_kinds():
        figure = comparison.plot("forgetting")
        parts.append(_embedded("forgetting", figure, COMPARISON_CAPTIONS))
    return "<div class='fidelity-comparison'>" + "".join(parts) + "</div>"
