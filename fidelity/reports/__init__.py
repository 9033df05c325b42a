"""Figures and self-contained HTML reports for fidelity results."""

from fidelity.reports.html import (
    format_bytes,
    format_number,
    format_seconds,
    render_comparison,
    render_report,
    summary_table,
)
from fidelity.reports.plots import (
    comparison_depth,
    comparison_overlay,
    comparison_summary,
    decay_curves,
    depth_curve,
    forgetting_curve,
    forgetting_heatmap,
    format_token_count,
    influence_curves,
    retrieval_grid,
)

__all__ = [
    "comparison_depth",
    "comparison_overlay",
    "comparison_summary",
    "decay_curves",
    "depth_curve",
    "forgetting_curve",
    "forgetting_heatmap",
    "format_bytes",
    "format_number",
    "format_seconds",
    "format_token_count",
    "influence_curves",
    "render_comparison",
    "render_report",
    "retrieval_grid",
    "summary_table",
]
