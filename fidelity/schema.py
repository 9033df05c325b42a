"""The column schemas of every table the toolkit produces, stated once.

Plain data, no imports: the metrics build their frames with these names, and
:mod:`fidelity.results` checks, saves and loads them.

``TIDY_COLUMNS``: what each metric returns (one row per measurement); the analysis adds
``model``, ``checkpoint``, ``length`` and ``depth`` to make :data:`FRAME_COLUMNS`.
``SUMMARY_COLUMNS``: the per-layer summary of the normalized ETMF curve;
:func:`fidelity.metrics.etmf.etmf_summary` returns :data:`CURVE_SUMMARY_COLUMNS` (the same
statistics without ``model``/``checkpoint``, plus the curve fit's parameters).
"""

from __future__ import annotations

TIDY_COLUMNS = ("metric", "layer", "distance", "value", "ci_low", "ci_high", "n", "source_layer")
"""Columns of every metric frame; for horizontal metrics ``source_layer == layer``."""

TIDY_INTEGER_COLUMNS = ("layer", "distance", "n", "source_layer")
"""Columns of :data:`TIDY_COLUMNS` stored as int64."""

FRAME_COLUMNS: dict[str, str] = {
    "model": "str",
    "checkpoint": "str",
    "metric": "str",
    "layer": "int",
    "source_layer": "int",
    "distance": "int",
    "value": "float",
    "ci_low": "float",
    "ci_high": "float",
    "n": "int",
    "length": "int",
    "depth": "float",
}
"""A result's tidy frame's columns, in order, with their kind (stored as str, int64, float64)."""

SUMMARY_STATISTICS = (
    "farthest_distance",
    "peak_distance",
    "memory_mass",
    "contiguous_length",
    "half_life",
)
"""Per-layer statistics of the normalized ETMF curve that carry a bootstrap interval
(``<name>_low``, ``<name>_high``); see :mod:`fidelity.metrics.curves`."""

SUMMARY_COLUMNS: dict[str, str] = {
    "model": "str",
    "checkpoint": "str",
    "layer": "int",
    "farthest_distance": "float",
    "farthest_distance_low": "float",
    "farthest_distance_high": "float",
    "peak_distance": "float",
    "peak_distance_low": "float",
    "peak_distance_high": "float",
    "peak_value": "float",
    "memory_mass": "float",
    "memory_mass_low": "float",
    "memory_mass_high": "float",
    "contiguous_length": "float",
    "contiguous_length_low": "float",
    "contiguous_length_high": "float",
    "half_life": "float",
    "half_life_low": "float",
    "half_life_high": "float",
    "half_life_r2": "float",
}
"""The summary's leading columns; further columns (``etmf_norm@{d}``, ...) must be numeric.

``farthest_distance``: the largest distance with normalized ETMF >= 0.5; ``peak_distance``:
the distance beyond 0 where normalized ETMF is highest, ``peak_value`` its value there;
``memory_mass``: area under normalized ETMF over log2-distance (doublings); ``contiguous_length``:
the largest distance up to which normalized ETMF never drops below 0.5; ``half_life``: of an
exponential fit, NaN unless the curve is an exponential decay; ``half_life_r2``: that fit's
goodness of fit (NaN without a converged fit). ``_low``/``_high``: bootstrap intervals over anchors.
"""

CURVE_FIT_COLUMNS: dict[str, str] = {
    "decaying": "bool",
    "tau": "float",
    "amplitude": "float",
    "offset": "float",
    "converged": "bool",
    "n_boot_converged": "int",
}
"""The exponential fit ``amplitude * exp(-d / tau) + offset`` behind ``half_life``: whether the
curve decays, the fit's parameters, whether it converged, and on how many bootstrap replicates."""

CURVE_SUMMARY_COLUMNS: dict[str, str] = {
    **{c: kind for c, kind in SUMMARY_COLUMNS.items() if c not in ("model", "checkpoint")},
    **CURVE_FIT_COLUMNS,
}
"""Columns of :func:`fidelity.metrics.etmf.etmf_summary`: the summary statistics per layer,
then the curve fit."""
