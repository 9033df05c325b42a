"""Forgetting curves: where a curve holds memory, exponential fits, bootstrap intervals.

A forgetting curve is a score per distance (normalized ETMF, usually). Memory in trained
models is often not monotone in distance (copying at a lag, induction, retrieval), so the
statistics that summarize a curve hold for any shape:

- *farthest distance*: the largest distance at which the score is at or above 0.5, whatever
  happens at shorter distances;
- *peak distance*: the distance beyond 0 where the score is highest (none when that is below
  :data:`PEAK_FLOOR`, i.e. noise around chance);
- *memory mass*: the area under the score over log2-distance (in doublings);
- *contiguous length*: the largest distance up to which the score never drops below 0.5
  (memory without a gap; 0 for a curve that dips at distance 1 and recovers).

An exponential fit ``value(d) = a * exp(-d / tau) + c`` (half-life ``tau * ln 2``: the distance
over which the excess above the floor ``c`` halves) is reported with its goodness of fit
``R^2``, and its half-life only when the curve is an exponential decay (:func:`is_decaying`).

Intervals are percentile bootstraps over anchors. A bootstrap replicate is represented by how
often it draws each anchor, so replicates are a count matrix `(n_anchors, n_boot)` and a
resampled mean is one matrix product (:func:`bootstrap_counts`).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np
import torch

DEFAULT_LEVEL = 0.95
"""Coverage of the percentile intervals."""

MEMORY_THRESHOLD = 0.5
"""Normalized score that a distance must keep to count as remembered."""

PEAK_FLOOR = 0.1
"""A curve whose highest value beyond distance 0 is below this has no peak: its maximum is
noise around chance (the largest of many near-zero values), not a place where memory sits."""

_TAU_GRID_SIZE = 120
_TAU_GRID_SPAN = 1e3  # tau is searched within [min spacing / 1e3, span * 1e3]
_GOLDEN_STEPS = 64  # shrink the bracket in log tau by 0.618**64 ~ 1e-13
_INVERSE_GOLDEN = (math.sqrt(5) - 1) / 2


def _as_1d_float(name: str, values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative int (0 skips intervals), got {n_boot!r}")
    return n_boot


def bootstrap_counts(n: int, n_boot: int, seed: int | list[int] = 0) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``n_boot`` bootstrap replicates.

    Returns `(n, n_boot)` float64 counts; each column sums to ``n``. ``seed`` is anything
    :func:`numpy.random.default_rng` accepts (an int, or a list such as ``[seed, distance]``).
    """
    if n < 1:
        raise ValueError(f"bootstrap needs at least one item, got n={n}")
    n_boot = _check_n_boot(n_boot)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    flat = (draws + n * np.arange(n_boot)[:, None]).ravel()  # replicate-major cell indices
    counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)
    return counts.T.astype(np.float64)


def percentile_interval(
    samples: np.ndarray, level: float = DEFAULT_LEVEL, discrete: bool = False
) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` `(n_boot,)`, ignoring NaN.

    ``discrete``: the bounds are sample values (the low one rounded down, the high one up), as
    for distances, which are not interpolated. Returns ``(nan, nan)`` when no sample is finite.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = (1 - _check_level(level)) / 2 * 100
    if discrete:
        low = np.percentile(samples, tail, method="lower")
        high = np.percentile(samples, 100 - tail, method="higher")
    else:
        low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def normalize(score: np.ndarray | float, chance: np.ndarray | float) -> np.ndarray:
    """``(score - chance) / (1 - chance)``, NaN where the chance level is (numerically) 1."""
    score = np.asarray(score, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    room = 1.0 - chance
    ok = room > 1e-12
    return np.where(ok, (score - chance) / np.where(ok, room, 1.0), np.nan)


def present_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of ``values`` `(..., n)` over their entries that are not NaN.

    ``weights`` `(n, k)` (bootstrap counts, or a column of ones). NaN entries are missing
    anchors and carry no weight. Returns `(..., k)`, NaN where no weighted entry is present.
    """
    present = ~np.isnan(values)
    totals = np.where(present, values, 0.0) @ weights
    counts = present.astype(np.float64) @ weights
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan)


def mean_with_interval(
    values: np.ndarray, counts: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> tuple[float, float, float]:
    """Mean of per-anchor ``values`` `(n,)` and its bootstrap interval.

    ``counts`` `(n, n_boot)` from :func:`bootstrap_counts`, or None (or zero replicates) for
    no interval. NaN entries are anchors without a sample: they are left out of the mean and
    of every replicate (a replicate that draws none of the others is NaN and ignored by the
    interval). Returns ``(mean, low, high)``; all NaN when no anchor has a value.
    """
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    if not present.any():
        return math.nan, math.nan, math.nan
    mean = float(values[present].mean())
    if counts is None or counts.shape[1] == 0:
        return mean, math.nan, math.nan
    replicates = present_mean(values, counts)  # (n_boot,)
    return (mean, *percentile_interval(replicates, level))


def normalized_with_interval(
    score: np.ndarray, chance: np.ndarray, counts: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> tuple[float, float, float]:
    """Normalized score ``(mean(score) - mean(chance)) / (1 - mean(chance))`` with interval.

    ``score`` and ``chance`` `(n,)` are per-anchor values; a replicate resamples both with the
    same anchors. An anchor where either is NaN has no sample and is left out of both.
    ``counts`` as in :func:`mean_with_interval`. Returns ``(value, low, high)``.
    """
    score = np.asarray(score, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    present = ~(np.isnan(score) | np.isnan(chance))
    if not present.any():
        return math.nan, math.nan, math.nan
    value = float(normalize(score[present].mean(), chance[present].mean()))
    if counts is None or counts.shape[1] == 0:
        return value, math.nan, math.nan
    score, chance = np.where(present, score, np.nan), np.where(present, chance, np.nan)
    replicates = normalize(present_mean(score, counts), present_mean(chance, counts))
    return (value, *percentile_interval(replicates, level))


def _row_intervals(replicates: np.ndarray, level: float) -> np.ndarray:
    """:func:`percentile_interval` of every row of ``replicates`` `(r, n_boot)`: `(r, 2)`."""
    tail = (1 - _check_level(level)) / 2 * 100
    bounds = np.full((replicates.shape[0], 2), np.nan)
    finite = np.isfinite(replicates)
    whole = finite.all(axis=1)
    if whole.any():  # every replicate finite: all rows in one call (nanpercentile takes a
        # Python call per row); the same order statistics and interpolation
        bounds[whole] = np.percentile(replicates[whole], [tail, 100 - tail], axis=1).T
    rows = finite.any(axis=1) & ~whole
    if rows.any():
        kept = np.where(finite[rows], replicates[rows], np.nan)  # NaN: left out, as there
        bounds[rows] = np.nanpercentile(kept, [tail, 100 - tail], axis=1).T
    return bounds


def _row_means(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean of the ``present`` entries of each row of ``values`` `(r, n)`, NaN for none."""
    return np.array(
        [
            row[kept].mean() if kept.any() else np.nan
            for row, kept in zip(values, present, strict=True)
        ]
    )


def _row_replicates(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`present_mean` of each row of ``values`` `(r, n)` on its own: `(r, n_boot)`.

    Row by row, so that a row's replicates are the same numbers whichever rows it comes with
    (one matrix product of all rows would round differently as their number changes)."""
    replicates = np.empty((len(values), counts.shape[1]))
    for row, row_values in enumerate(values):
        replicates[row] = present_mean(row_values, counts)
    return replicates


def rows_with_interval(
    values: np.ndarray, counts: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> np.ndarray:
    """:func:`mean_with_interval` of every row of ``values`` `(r, n)` at once (the same
    replicates ``counts`` `(n, n_boot)` for all): `(r, 3)` of ``(mean, low, high)``."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    result = np.full((values.shape[0], 3), np.nan)
    result[:, 0] = _row_means(values, present)
    if counts is not None and counts.shape[1] > 0:
        result[:, 1:] = _row_intervals(_row_replicates(values, counts), level)
    result[~present.any(axis=1)] = np.nan
    return result


def normalized_rows_with_interval(
    score: np.ndarray, chance: np.ndarray, counts: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> np.ndarray:
    """:func:`normalized_with_interval` of every row of ``score`` and ``chance`` `(r, n)` at
    once: `(r, 3)` of ``(value, low, high)``."""
    score = np.asarray(score, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    present = ~(np.isnan(score) | np.isnan(chance))
    score, chance = np.where(present, score, np.nan), np.where(present, chance, np.nan)
    result = np.full((score.shape[0], 3), np.nan)
    result[:, 0] = normalize(_row_means(score, present), _row_means(chance, present))
    if counts is not None and counts.shape[1] > 0:
        replicates = normalize(_row_replicates(score, counts), _row_replicates(chance, counts))
        result[:, 1:] = _row_intervals(replicates, level)
    result[~present.any(axis=1)] = np.nan
    return result


@dataclass(frozen=True)
class ExponentialFit:
    """``value(d) = a * exp(-d / tau) + c``; ``half_life = tau * ln 2``.

    ``converged`` is False when the amplitude is negligible (a flat curve), or ``tau`` ended at
    a search bound (no decay visible within the distances, or a drop faster than the first
    step); the parameters are then the best found, to be read with care.
    """

    a: float
    tau: float
    c: float
    half_life: float
    converged: bool


@dataclass(frozen=True)
class ExponentialFits:
    """Fits of several curves at once: :class:`ExponentialFit`'s fields as `(k,)` arrays.

    A curve with values at fewer than three distinct distances has NaN parameters and
    ``converged`` False.
    """

    a: np.ndarray
    tau: np.ndarray
    c: np.ndarray
    half_life: np.ndarray
    converged: np.ndarray


def _profiled(
    d: np.ndarray, v: np.ndarray, taus: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares ``a``, ``c`` and the sum of squared errors for each curve at given ``tau``.

    ``d`` `(n,)`, curves ``v`` `(n, k)`, ``taus`` `(m, k)` (``m`` candidates per curve).
    Returns ``(a, c, sse)``, each `(m, k)`; ``a = 0``, ``c = mean`` where the basis is constant.
    """
    n = d.size
    basis = np.exp(-d / taus[:, :, None])  # (m, k, n)
    sum_b, sum_bb = basis.sum(2), (basis**2).sum(2)  # (m, k)
    sum_v, sum_bv = v.sum(0), np.einsum("mkn,nk->mk", basis, v)
    det = n * sum_bb - sum_b**2
    ok = det > 1e-12 * n * np.maximum(sum_bb, 1e-300)
    safe_det = np.where(ok, det, 1.0)
    a = np.where(ok, (n * sum_bv - sum_b * sum_v) / safe_det, 0.0)
    c = np.where(ok, (sum_v - a * sum_b) / n, v.mean(0))
    sse = (((a[:, :, None] * basis + c[:, :, None]) - v.T) ** 2).sum(2)
    return a, c, sse


def _fit_complete(d: np.ndarray, v: np.ndarray) -> ExponentialFits:
    """Fit curves ``v`` `(n, k)` with a value at every one of the distances ``d`` `(n,)` (at
    least three distinct); see :func:`fit_exponentials`."""
    unique = np.unique(d)
    origin = unique[0]
    d = d - origin  # fit on shifted distances for conditioning; a is shifted back below
    tau_low = float(np.diff(unique).min()) / _TAU_GRID_SPAN
    tau_high = float(unique[-1] - origin) * _TAU_GRID_SPAN
    k = v.shape[1]
    columns = np.arange(k)
    grid = np.geomspace(tau_low, tau_high, _TAU_GRID_SIZE)
    a, c, sse = _profiled(d, v, np.repeat(grid[:, None], k, axis=1))  # (n_tau, k)
    best = np.argmin(sse, axis=0)  # (k,)
    tau = grid[best]
    a, c, sse = a[best, columns], c[best, columns], sse[best, columns]
    # the profiled SSE has a local minimum between the grid neighbours of the best grid point
    low = np.log(grid[np.maximum(best - 1, 0)])
    high = np.log(grid[np.minimum(best + 1, _TAU_GRID_SIZE - 1)])
    for _ in range(_GOLDEN_STEPS):
        inner = (high - low) * _INVERSE_GOLDEN
        probes = np.stack([high - inner, low + inner])  # (2, k) in log tau
        _, _, probe_sse = _profiled(d, v, np.exp(probes))
        left = probe_sse[0] <= probe_sse[1]  # a minimum lies in [low, right probe]
        high = np.where(left, probes[1], high)
        low = np.where(left, low, probes[0])
    refined = np.exp((low + high) / 2)[None, :]
    a_refined, c_refined, sse_refined = (x[0] for x in _profiled(d, v, refined))
    better = sse_refined <= sse
    tau = np.where(better, refined[0], tau)
    a, c = np.where(better, a_refined, a), np.where(better, c_refined, c)
    inside = (tau_low * 1.01 < tau) & (tau < tau_high / 1.01)
    with np.errstate(over="ignore", invalid="ignore"):
        a_origin = np.where(origin / tau < 700, a * np.exp(np.minimum(origin / tau, 700)), np.inf)
    visible = np.abs(a) > 1e-9 * np.maximum(np.abs(v).max(0), 1e-300)  # any decay at all
    converged = inside & visible & np.isfinite(a_origin)
    return ExponentialFits(a_origin, tau, c, tau * math.log(2), converged)


def fit_exponentials(distances: object, curves: object) -> ExponentialFits:
    """Fit each column of ``curves`` `(n_dist, k)` as ``a * exp(-distances / tau) + c``.

    ``distances`` `(n_dist,)`. Each curve ignores its non-finite values and needs values at
    three distinct distances (else NaN parameters, not converged). For each curve, ``a`` and
    ``c`` are solved in closed form for any ``tau``, so the fit searches ``tau`` alone: the
    best of a log grid within ``[min spacing / 1e3, span * 1e3]`` (of the curve's distances),
    then a golden-section search of the sum of squared errors between that point's grid
    neighbours. All curves with the same finite distances are fitted together.
    """
    d = _as_1d_float("distances", distances)
    v = _curves_matrix("curves", d, curves)
    k = v.shape[1]
    fields = [np.full(k, np.nan) for _ in range(4)] + [np.zeros(k, dtype=bool)]
    finite = np.isfinite(v) & np.isfinite(d)[:, None]  # (n_dist, k)
    patterns, which = np.unique(finite.T, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        if np.unique(d[pattern]).size < 3:
            continue
        columns = np.flatnonzero(which.ravel() == p)
        fits = _fit_complete(d[pattern], v[np.ix_(pattern, columns)])
        for field, values in zip(fields, astuple(fits), strict=True):
            field[columns] = values
    return ExponentialFits(*fields)


def fit_exponential(distances: object, values: object) -> ExponentialFit:
    """Fit ``values ~ a * exp(-distances / tau) + c`` with ``tau > 0``.

    ``distances``, ``values`` `(n,)`; pairs with a non-finite value are ignored and at least
    three distinct distances must remain. The method is that of :func:`fit_exponentials`.
    """
    d = _as_1d_float("distances", distances)
    v = _as_1d_float("values", values)
    if d.shape != v.shape:
        raise ValueError(f"distances and values need the same length, got {d.size} and {v.size}")
    finite = np.isfinite(v) & np.isfinite(d)
    if np.unique(d[finite]).size < 3:
        raise ValueError(
            f"need values at >= 3 distinct distances to fit a, tau, c; got "
            f"{np.unique(d[finite]).size}"
        )
    fits = fit_exponentials(d[finite], v[finite])
    a, tau, c, half_life, converged = (field[0] for field in astuple(fits))
    return ExponentialFit(float(a), float(tau), float(c), float(half_life), bool(converged))


DECAY_MIN_R2 = 0.9
"""An exponential fit must explain this share of a curve's variance (R^2) for its half-life to
be reported; below it the curve is not an exponential decay and the half-life is left out."""


def fit_r2(distances: object, values: object, fit: ExponentialFit) -> float:
    """Coefficient of determination ``1 - SSE / SST`` of ``fit`` on the finite ``values``.

    ``distances``, ``values`` `(n,)`. NaN when the values have no variance (a flat curve).
    """
    d = _as_1d_float("distances", distances)
    v = _as_1d_float("values", values)
    finite = np.isfinite(v) & np.isfinite(d)
    d, v = d[finite], v[finite]
    total = float(((v - v.mean()) ** 2).sum())
    if total <= 1e-24 * max(float((v**2).sum()), 1e-300):  # constant up to rounding
        return math.nan
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = fit.a * np.exp(-d / fit.tau) + fit.c
    residual = float(((predicted - v) ** 2).sum())
    return 1.0 - residual / total if math.isfinite(residual) else math.nan


def is_decaying(fit: ExponentialFit | None, r2: float) -> bool:
    """Whether a curve is an exponential decay: converged fit, falling (``a > 0``), and
    ``r2 >= DECAY_MIN_R2``."""
    return fit is not None and fit.converged and fit.a > 0 and r2 >= DECAY_MIN_R2


def _curves_matrix(name: str, distances: np.ndarray, curves: object) -> np.ndarray:
    """``curves`` as float64 `(n_dist, k)` (a `(n_dist,)` curve becomes one column)."""
    matrix = np.asarray(curves, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.shape[0] != distances.size:
        raise ValueError(
            f"{name} must be (n_dist={distances.size},) or (n_dist, k), got {matrix.shape}"
        )
    return matrix


def _squeeze(values: np.ndarray, curves: object) -> np.ndarray | float:
    return float(values[0]) if np.ndim(curves) == 1 else values


def farthest_distance(
    distances: object, curves: object, threshold: float = MEMORY_THRESHOLD
) -> np.ndarray | float:
    """Largest distance at which a curve is at or above ``threshold``; shorter distances may
    fall below it (a curve that holds a token only at lag 8 has farthest distance 8).

    ``distances`` `(n_dist,)` (any order); ``curves`` `(n_dist,)` or `(n_dist, k)`, NaN where
    a distance has no estimate. Returns a float (or `(k,)`): 0 when no distance reaches the
    threshold, the largest distance probed when that one does (a lower bound then).
    """
    d = _as_1d_float("distances", distances)
    v = _curves_matrix("curves", d, curves)
    with np.errstate(invalid="ignore"):
        held = v >= threshold  # NaN compares False
    farthest = np.where(held, d[:, None], 0.0).max(axis=0, initial=0.0)
    return _squeeze(farthest, curves)


def contiguous_length(
    distances: object, curves: object, threshold: float = MEMORY_THRESHOLD
) -> np.ndarray | float:
    """Largest distance ``d`` with a curve at or above ``threshold`` at every distance up to
    ``d``: memory without a gap.

    ``distances`` `(n_dist,)` (any order); ``curves`` `(n_dist,)` or `(n_dist, k)` (NaN
    entries, distances without an estimate, are skipped). Returns a float (or `(k,)`): 0 when
    the smallest distance already falls below the threshold, the largest distance probed when
    none does (a lower bound then).
    """
    d = _as_1d_float("distances", distances)
    v = _curves_matrix("curves", d, curves)
    order = np.argsort(d, kind="stable")
    d, v = d[order], v[order]
    with np.errstate(invalid="ignore"):
        below = v < threshold  # NaN compares False: skipped
    unbroken = np.cumsum(below, axis=0) == 0  # (n_dist, k): no drop so far
    present = ~np.isnan(v)
    length = np.where(unbroken & present, d[:, None], 0.0).max(axis=0, initial=0.0)
    return _squeeze(length, curves)


def peak_distance(
    distances: object, curves: object, floor: float = PEAK_FLOOR
) -> np.ndarray | float:
    """Distance beyond 0 at which a curve is highest (the first such distance on ties).

    ``distances`` `(n_dist,)`; ``curves`` `(n_dist,)` or `(n_dist, k)`. NaN when no distance
    beyond 0 has a value, or when the highest value is below ``floor`` (no peak above noise).
    """
    d = _as_1d_float("distances", distances)
    v = _curves_matrix("curves", d, curves)
    beyond = d > 0
    d, v = d[beyond], v[beyond]
    order = np.argsort(d, kind="stable")
    d, v = d[order], v[order]
    if d.size == 0:
        return _squeeze(np.full(v.shape[1], np.nan), curves)
    filled = np.where(np.isnan(v), -np.inf, v)
    best = np.argmax(filled, axis=0)  # (k,)
    highest = filled[best, np.arange(v.shape[1])]
    peak = np.where(highest >= floor, d[best], np.nan)
    return _squeeze(peak, curves)


def memory_mass(distances: object, curves: object) -> np.ndarray | float:
    """Area under a curve over ``log2`` of the distance, from the smallest distance >= 1 to the
    largest (trapezoids; NaN entries are left out, their neighbours joined).

    Units: doublings of distance. A curve at 1 from distance 1 to ``D`` has mass ``log2(D)``;
    a curve at chance has mass near 0 (values are not clipped, so noise averages out). It
    grows with the range of distances probed: compare masses over the same distances.
    ``distances`` `(n_dist,)`; ``curves`` `(n_dist,)` or `(n_dist, k)`. Returns a float (or
    `(k,)`), NaN with fewer than two values at distances >= 1.
    """
    d = _as_1d_float("distances", distances)
    v = _curves_matrix("curves", d, curves)
    keep = d >= 1
    d, v = d[keep], v[keep]
    order = np.argsort(d, kind="stable")
    x, v = np.log2(d[order]), v[order]
    mass = np.full(v.shape[1], np.nan)
    complete = ~np.isnan(v).any(axis=0)
    if x.size >= 2 and complete.any():
        mass[complete] = _trapezoid(v[:, complete], x)
    for column in np.flatnonzero(~complete):  # rare: replicates that lost a distance
        present = ~np.isnan(v[:, column])
        if present.sum() >= 2:
            mass[column] = _trapezoid(v[present, column][:, None], x[present])[0]
    return _squeeze(mass, curves)


def _trapezoid(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid integral of ``values`` `(n, k)` over ascending ``x`` `(n,)` -> `(k,)`."""
    return (np.diff(x)[:, None] * (values[1:] + values[:-1]) / 2).sum(axis=0)


@dataclass(frozen=True)
class Statistic:
    """A curve statistic and its percentile bootstrap interval (NaN when not computed)."""

    value: float
    low: float
    high: float


def _statistic(values: np.ndarray, level: float, discrete: bool = False) -> Statistic:
    """``values`` `(1 + n_boot,)`: the curve's statistic, then one per replicate."""
    low, high = percentile_interval(values[1:], level, discrete)
    return Statistic(float(values[0]), low, high)


@dataclass(frozen=True)
class CurveSummary:
    """One forgetting curve, summarized; every statistic holds for curves of any shape.

    ``distances`` `(n_dist,)`; ``curve`` `(n_dist,)` the (normalized) mean score per distance.
    ``farthest``: the largest distance with ``curve >= threshold`` (:func:`farthest_distance`);
    ``peak``: the distance beyond 0 where the curve is highest (:func:`peak_distance`) and
    ``peak_value`` the curve there; ``mass``: area under the curve over log2-distance
    (:func:`memory_mass`); ``contiguous``: the largest distance up to which the curve never
    drops below the threshold (:func:`contiguous_length`). Intervals resample anchors.

    ``fit`` the exponential fit of ``curve`` (None with fewer than 3 distances), ``r2`` its
    goodness of fit (NaN when the fit did not converge: no decay within the distances, or one
    faster than the first step), ``decaying`` whether the curve is an exponential decay
    (:func:`is_decaying`); ``half_life`` is reported only then, with ``half_life_ci`` over the
    ``n_boot_converged`` replicates whose refit converged (NaN otherwise).
    """

    distances: np.ndarray
    curve: np.ndarray
    farthest: Statistic
    peak: Statistic
    peak_value: float
    mass: Statistic
    contiguous: Statistic
    fit: ExponentialFit | None
    r2: float
    decaying: bool
    half_life_ci: tuple[float, float]
    n_boot_converged: int

    @property
    def half_life(self) -> float:
        """Half-life of the fitted curve; NaN unless the curve is an exponential decay."""
        return self.fit.half_life if self.decaying else math.nan


def _as_anchor_matrix(name: str, values: object, n_dist: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != n_dist:
        raise ValueError(f"{name} must be (n_dist={n_dist}, n_anchors), got shape {matrix.shape}")
    return matrix


def _curve_from_counts(
    scores: np.ndarray, chance: np.ndarray | None, weights: np.ndarray
) -> np.ndarray:
    """Weighted mean per distance, NaN-aware: ``weights`` `(n_anchors, k)` -> `(n_dist, k)`."""
    mean_score = present_mean(scores, weights)
    return mean_score if chance is None else normalize(mean_score, present_mean(chance, weights))


def _try_fit(distances: np.ndarray, curve: np.ndarray) -> ExponentialFit | None:
    finite = np.isfinite(curve)
    if np.unique(distances[finite]).size < 3:
        return None
    return fit_exponential(distances, curve)


def _replicate_half_lives(distances: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Half-lives `(n_converged,)` of the replicate curves `(n_dist, n_boot)` whose refit
    converged."""
    fits = fit_exponentials(distances, replicates)
    return fits.half_life[fits.converged]


def summarize_curve(
    distances: object,
    scores: object,
    chance: object | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    threshold: float = MEMORY_THRESHOLD,
) -> CurveSummary:
    """Where one layer's curve holds memory, with bootstrap intervals (see :class:`CurveSummary`).

    ``distances`` `(n_dist,)`; ``scores`` `(n_dist, n_anchors)` per-anchor scores (NaN where an
    anchor has no valid ``t + d``); ``chance`` the matching per-anchor chance scores or None.
    With ``chance`` the curve is ``normalize(mean score, mean chance)`` per distance; without,
    ``scores`` are taken as already normalized and averaged. Each of ``n_boot`` replicates
    resamples anchors (columns, jointly for all distances) and rebuilds the curve; the
    statistics of all replicates are computed at once, and the exponential is refitted per
    replicate only when the curve itself is decaying. ValueError when no distance has a value.
    """
    d = _as_1d_float("distances", distances)
    scores = _as_anchor_matrix("scores", scores, d.size)
    if chance is not None:
        chance = _as_anchor_matrix("chance", chance, d.size)
        if chance.shape != scores.shape:
            raise ValueError(f"chance {chance.shape} must match scores {scores.shape}")
    n_boot = _check_n_boot(n_boot)
    n_anchors = scores.shape[1]
    weights = np.ones((n_anchors, 1))
    if n_boot > 0:
        weights = np.concatenate([weights, bootstrap_counts(n_anchors, n_boot, seed)], axis=1)
    curves = _curve_from_counts(scores, chance, weights)  # (n_dist, 1 + n_boot)
    curve = curves[:, 0]
    if not np.isfinite(curve).any():
        raise ValueError("the curve has no finite value at any distance; nothing to summarize")
    fit = _try_fit(d, curve)
    r2 = fit_r2(d, curve, fit) if fit is not None and fit.converged else math.nan
    decaying = is_decaying(fit, r2)
    half_lives = _replicate_half_lives(d, curves[:, 1:]) if decaying else np.array([])
    peaks = np.atleast_1d(peak_distance(d, curves))
    peak_row = np.flatnonzero(d == peaks[0])
    return CurveSummary(
        distances=d,
        curve=curve,
        farthest=_statistic(farthest_distance(d, curves, threshold), level, discrete=True),
        peak=_statistic(peaks, level, discrete=True),
        peak_value=float(curve[peak_row[0]]) if peak_row.size else math.nan,
        mass=_statistic(memory_mass(d, curves), level),
        contiguous=_statistic(contiguous_length(d, curves, threshold), level, discrete=True),
        fit=fit,
        r2=r2,
        decaying=decaying,
        half_life_ci=percentile_interval(half_lives, level),
        n_boot_converged=int(half_lives.size),
    )
