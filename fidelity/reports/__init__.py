"""Figures and self-contained HTML reports for fidelity results.

The names below are imported on first use (module ``__getattr__``): importing one module of
this package (:mod:`fidelity.reports.labels`, :mod:`fidelity.reports.worker`, ...) does not
import matplotlib, which ``fidelity analyze`` leaves to its figure worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "comparison_depth": "fidelity.reports.plots",
    "comparison_overlay": "fidelity.reports.plots",
    "comparison_summary": "fidelity.reports.plots",
    "decay_curves": "fidelity.reports.plots",
    "depth_curve": "fidelity.reports.plots",
    "forgetting_curve": "fidelity.reports.plots",
    "forgetting_heatmap": "fidelity.reports.plots",
    "format_bytes": "fidelity.reports.html",
    "format_number": "fidelity.reports.html",
    "format_seconds": "fidelity.reports.html",
    "format_token_count": "fidelity.reports.labels",
    "influence_curves": "fidelity.reports.plots",
    "render_comparison": "fidelity.reports.html",
    "render_report": "fidelity.reports.html",
    "retrieval_grid": "fidelity.reports.plots",
    "summary_table": "fidelity.reports.html",
}

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

if TYPE_CHECKING:
    from fidelity.reports.html import (
        format_bytes,
        format_number,
        format_seconds,
        render_comparison,
        render_report,
        summary_table,
    )
    from fidelity.reports.labels import format_token_count
    from fidelity.reports.plots import (
        comparison_depth,
        comparison_overlay,
        comparison_summary,
        decay_curves,
        depth_curve,
        forgetting_curve,
        forgetting_heatmap,
        influence_curves,
        retrieval_grid,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fidelity.reports' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
