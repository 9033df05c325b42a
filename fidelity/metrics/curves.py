"""Forgetting curves: exponential fits, effective memory length, bootstrap intervals.

A forgetting curve is a score per distance (normalized ETMF, usually). It is summarized by
a fit ``value(d) = a * exp(-d / tau) + c`` (half-life ``tau * ln 2``: the distance over which
the excess above the floor ``c`` halves) and by the *effective memory length*: the largest
distance up to which the normalized score never drops below 0.5.

Intervals are percentile bootstraps over anchors. A bootstrap replicate is represented by how
often it draws each anchor, so replicates are a count matrix `(n_anchors, n_boot)` and a
resampled mean is one matrix product (:func:`bootstrap_counts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import curve_fit

DEFAULT_LEVEL = 0.95
"""Coverage of the percentile intervals."""

MEMORY_THRESHOLD = 0.5
"""Normalized score that a distance must keep to count as remembered."""

_TAU_GRID_SIZE = 120
_TAU_GRID_SPAN = 1e3  # tau is searched within [min spacing / 1e3, span * 1e3]


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
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts.T


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` `(n_boot,)`, ignoring NaN.

    Returns ``(nan, nan)`` when no sample is finite.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = (1 - _check_level(level)) / 2 * 100
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


@dataclass(frozen=True)
class ExponentialFit:
    """``value(d) = a * exp(-d / tau) + c``; ``half_life = tau * ln 2``.

    ``converged`` is False when the optimizer failed, the amplitude is negligible (a flat
    curve), or ``tau`` ended at a search bound (no decay visible within the distances, or a
    drop faster than the first step); the parameters are then the best found, to be read with
    care.
    """

    a: float
    tau: float
    c: float
    half_life: float
    converged: bool


def _exponential(d: np.ndarray, a: float, tau: float, c: float) -> np.ndarray:
    return a * np.exp(-d / tau) + c


def _exponential_jacobian(d: np.ndarray, a: float, tau: float, c: float) -> np.ndarray:
    """Partial derivatives `(n, 3)` of :func:`_exponential` with respect to ``a, tau, c``."""
    decay = np.exp(-d / tau)
    return np.stack([decay, a * d / tau**2 * decay, np.ones_like(d)], axis=1)


def _best_on_tau_grid(d: np.ndarray, v: np.ndarray, taus: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``(a, tau, c)`` with ``tau`` on a grid and ``a, c`` solved exactly."""
    basis = np.exp(-d[None, :] / taus[:, None])  # (n_tau, n)
    n = d.size
    sum_b, sum_bb = basis.sum(1), (basis**2).sum(1)
    sum_v, sum_bv = v.sum(), basis @ v
    det = n * sum_bb - sum_b**2
    ok = det > 1e-12 * n * np.maximum(sum_bb, 1e-300)
    safe_det = np.where(ok, det, 1.0)
    a = np.where(ok, (n * sum_bv - sum_b * sum_v) / safe_det, 0.0)
    c = np.where(ok, (sum_v - a * sum_b) / n, v.mean())
    sse = (((a[:, None] * basis + c[:, None]) - v[None, :]) ** 2).sum(1)
    best = int(np.argmin(sse))
    return float(a[best]), float(taus[best]), float(c[best])


def fit_exponential(distances: object, values: object) -> ExponentialFit:
    """Fit ``values ~ a * exp(-distances / tau) + c`` with ``tau > 0``.

    ``distances``, ``values`` `(n,)`; pairs with a non-finite value are ignored and at least
    three distinct distances must remain. Starting values come from a log grid of ``tau``
    (``a``, ``c`` solved in closed form for each), refined by
    :func:`scipy.optimize.curve_fit` within ``tau in [min spacing / 1e3, span * 1e3]``.
    """
    d = _as_1d_float("distances", distances)
    v = _as_1d_float("values", values)
    if d.shape != v.shape:
        raise ValueError(f"distances and values need the same length, got {d.size} and {v.size}")
    finite = np.isfinite(v) & np.isfinite(d)
    d, v = d[finite], v[finite]
    unique = np.unique(d)
    if unique.size < 3:
        raise ValueError(
            f"need values at >= 3 distinct distances to fit a, tau, c; got {unique.size}"
        )
    origin = unique[0]
    d = d - origin  # fit on shifted distances for conditioning; a is shifted back below
    tau_low = float(np.diff(unique).min()) / _TAU_GRID_SPAN
    tau_high = float(unique[-1] - origin) * _TAU_GRID_SPAN
    taus = np.geomspace(tau_low, tau_high, _TAU_GRID_SIZE)
    start = _best_on_tau_grid(d, v, taus)
    params, optimized = np.array(start), False
    try:
        fitted, _ = curve_fit(
            _exponential,
            d,
            v,
            p0=start,
            jac=_exponential_jacobian,
            bounds=([-np.inf, tau_low, -np.inf], [np.inf, tau_high, np.inf]),
            method="trf",
            x_scale="jac",
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
            max_nfev=2000,
        )
    except (RuntimeError, ValueError):
        fitted = None
    if fitted is not None and np.all(np.isfinite(fitted)):
        sse_fit = float(((_exponential(d, *fitted) - v) ** 2).sum())
        sse_start = float(((_exponential(d, *start) - v) ** 2).sum())
        if sse_fit <= sse_start:
            params, optimized = fitted, True
    a_shifted, tau, c = (float(p) for p in params)
    inside = tau_low * 1.01 < tau < tau_high / 1.01
    with np.errstate(over="ignore"):
        a = a_shifted * math.exp(origin / tau) if origin / tau < 700 else math.inf
    visible = abs(a_shifted) > 1e-9 * max(float(np.abs(v).max()), 1e-300)  # any decay at all
    converged = optimized and inside and visible and math.isfinite(a)
    return ExponentialFit(a=a, tau=tau, c=c, half_life=tau * math.log(2), converged=converged)


def effective_memory_length(
    distances: object, normalized: object, threshold: float = MEMORY_THRESHOLD
) -> int:
    """Largest distance ``d`` with ``normalized >= threshold`` at every distance up to ``d``.

    ``distances``, ``normalized`` `(n_dist,)` (any order; NaN entries, distances without an
    estimate, are skipped). Returns 0 when the smallest distance already falls below the
    threshold, and the largest distance probed when none does (a lower bound then).
    """
    d = _as_1d_float("distances", distances)
    v = _as_1d_float("normalized", normalized)
    if d.shape != v.shape:
        raise ValueError(
            f"distances and normalized need the same length, got {d.size} and {v.size}"
        )
    remembered = 0
    for distance, value in sorted(zip(d.tolist(), v.tolist(), strict=True)):
        if math.isnan(value):
            continue
        if value < threshold:
            break
        remembered = int(distance)
    return remembered


@dataclass(frozen=True)
class CurveSummary:
    """One forgetting curve, summarized.

    ``distances`` `(n_dist,)`; ``curve`` `(n_dist,)` the (normalized) mean score per distance;
    ``fit`` the exponential fit of ``curve``; ``half_life_ci`` and ``eml_ci`` percentile
    bootstrap intervals (anchors resampled, curve refitted; NaN when not computed);
    ``n_boot_converged`` how many replicates gave a converged fit (the half-life interval uses
    only those).
    """

    distances: np.ndarray
    curve: np.ndarray
    fit: ExponentialFit
    half_life_ci: tuple[float, float]
    effective_memory_length: int
    eml_ci: tuple[float, float]
    n_boot_converged: int

    @property
    def half_life(self) -> float:
        """Half-life of the fitted curve (NaN when the fit did not converge)."""
        return self.fit.half_life if self.fit.converged else math.nan


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


def summarize_curve(
    distances: object,
    scores: object,
    chance: object | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    threshold: float = MEMORY_THRESHOLD,
) -> CurveSummary:
    """Half-life and effective memory length of one layer's curve, with bootstrap intervals.

    ``distances`` `(n_dist,)`; ``scores`` `(n_dist, n_anchors)` per-anchor scores (NaN where an
    anchor has no valid ``t + d``); ``chance`` the matching per-anchor chance scores or None.
    With ``chance`` the curve is ``normalize(mean score, mean chance)`` per distance; without,
    ``scores`` are taken as already normalized and averaged. Each of ``n_boot`` replicates
    resamples anchors (columns, jointly for all distances), rebuilds the curve and refits it.
    """
    d = _as_1d_float("distances", distances)
    scores = _as_anchor_matrix("scores", scores, d.size)
    if chance is not None:
        chance = _as_anchor_matrix("chance", chance, d.size)
        if chance.shape != scores.shape:
            raise ValueError(f"chance {chance.shape} must match scores {scores.shape}")
    n_boot = _check_n_boot(n_boot)
    n_anchors = scores.shape[1]
    curve = _curve_from_counts(scores, chance, np.ones((n_anchors, 1)))[:, 0]  # (n_dist,)
    fit = _try_fit(d, curve)
    if fit is None:
        raise ValueError("the curve has finite values at fewer than 3 distances; cannot fit it")
    half_lives, lengths = [], []
    if n_boot > 0:
        replicates = _curve_from_counts(scores, chance, bootstrap_counts(n_anchors, n_boot, seed))
        for column in replicates.T:  # (n_dist,) per replicate
            lengths.append(effective_memory_length(d, column, threshold))
            replicate_fit = _try_fit(d, column)
            if replicate_fit is not None and replicate_fit.converged:
                half_lives.append(replicate_fit.half_life)
    return CurveSummary(
        distances=d,
        curve=curve,
        fit=fit,
        half_life_ci=percentile_interval(np.array(half_lives), level),
        effective_memory_length=effective_memory_length(d, curve, threshold),
        eml_ci=percentile_interval(np.array(lengths, dtype=np.float64), level),
        n_boot_converged=len(half_lives),
    )
