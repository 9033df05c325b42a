"""The batched exponential fit against the per-curve scipy fit it replaced (trust-region
refinement of the same grid start), on random and bootstrap-replicate curves."""

import math

import numpy as np
import pytest
from scipy.optimize import curve_fit

from fidelity.metrics.curves import (
    bootstrap_counts,
    fit_exponential,
    fit_exponentials,
    present_mean,
    summarize_curve,
)

DISTANCES = np.array([0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128])


def _sse(d, v, a, tau, c):
    return float(((a * np.exp(-d / tau) + c - v) ** 2).sum())


def scipy_fit(d, v):
    """``(a, tau, c, converged)``: the former per-curve fit (grid start, scipy ``trf``)."""
    keep = np.isfinite(v)
    d, v = d[keep].astype(float), v[keep]
    unique = np.unique(d)
    origin, d = unique[0], d - unique[0]
    low, high = np.diff(unique).min() / 1e3, unique[-1] * 1e3 - origin * 1e3
    taus = np.geomspace(low, high, 120)
    fits = []
    for tau in taus:
        basis = np.stack([np.exp(-d / tau), np.ones_like(d)], axis=1)
        (a, c), *_ = np.linalg.lstsq(basis, v, rcond=None)
        fits.append((_sse(d, v, a, tau, c), a, tau, c))
    start = min(fits)[1:]
    fitted, _ = curve_fit(
        lambda x, a, tau, c: a * np.exp(-x / tau) + c,
        d,
        v,
        p0=start,
        bounds=([-np.inf, low, -np.inf], [np.inf, high, np.inf]),
        method="trf",
        x_scale="jac",
        ftol=1e-12,
        xtol=1e-12,
        gtol=1e-12,
        max_nfev=2000,
    )
    if _sse(d, v, *fitted) > _sse(d, v, *start):
        fitted = start
    a, tau, c = fitted
    visible = abs(a) > 1e-9 * np.abs(v).max()
    converged = low * 1.01 < tau < high / 1.01 and visible
    return a * math.exp(origin / tau), tau, c, converged


def _replicates(seed: int, n_anchors: int = 48, n_boot: int = 60) -> np.ndarray:
    """Bootstrap replicate curves `(n_dist, n_boot)` of a noisy random exponential."""
    rng = np.random.default_rng(seed)
    a, tau, c = rng.uniform(-1, 2), 10 ** rng.uniform(-0.5, 2.5), rng.uniform(-0.3, 0.5)
    noise = 10 ** rng.uniform(-4, -0.7)
    curve = a * np.exp(-DISTANCES / tau) + c
    scores = curve[:, None] + noise * rng.standard_normal((DISTANCES.size, n_anchors))
    return present_mean(scores, bootstrap_counts(n_anchors, n_boot, seed))


@pytest.mark.parametrize("seed", range(6))
def test_batched_fits_agree_with_scipy_on_replicates(seed):
    curves = _replicates(seed)
    curves[[2, 5], [3, 7]] = np.nan  # replicates that lost a distance are fitted without it
    fits = fit_exponentials(DISTANCES, curves)
    for j in range(curves.shape[1]):
        a, tau, c, converged = scipy_fit(DISTANCES, curves[:, j])
        assert fits.converged[j] == converged
        if converged:
            # the profile of tau is flat at a noisy curve's optimum: scipy stops within 1e-4,
            # and the batched search never ends at a worse sum of squared errors
            assert fits.tau[j] == pytest.approx(tau, rel=1e-4)
            assert fits.half_life[j] == pytest.approx(tau * math.log(2), rel=1e-4)
            keep = np.isfinite(curves[:, j])
            d, v = DISTANCES[keep], curves[keep, j]
            new = _sse(d, v, fits.a[j], fits.tau[j], fits.c[j])
            assert new <= _sse(d, v, a, tau, c) * (1 + 1e-9) + 1e-300


def test_batched_fits_match_single_fits_and_mark_curves_without_three_distances():
    curves = _replicates(11, n_boot=8)
    curves[:, 0] = np.nan
    curves[2:, 1] = np.nan  # values at two distances only
    fits = fit_exponentials(DISTANCES, curves)
    assert not fits.converged[:2].any() and np.isnan(fits.tau[:2]).all()
    for j in range(2, curves.shape[1]):
        single = fit_exponential(DISTANCES, curves[:, j])
        assert single.converged == fits.converged[j]  # rounding differs in a batch: the
        assert single.tau == pytest.approx(fits.tau[j], rel=1e-6)  # search may end elsewhere


def test_half_life_interval_matches_the_scipy_refits():
    rng = np.random.default_rng(5)
    scores = 0.9 * np.exp(-DISTANCES / 14.0)[:, None] + 0.05 * rng.standard_normal((20, 64))
    summary = summarize_curve(DISTANCES, scores, n_boot=80, seed=3)
    assert summary.decaying
    replicates = present_mean(scores, bootstrap_counts(64, 80, 3))
    reference = [scipy_fit(DISTANCES, column) for column in replicates.T]
    half_lives = np.array([tau * math.log(2) for _, tau, _, ok in reference if ok])
    assert summary.n_boot_converged == half_lives.size
    low, high = np.percentile(half_lives, [2.5, 97.5])
    assert summary.half_life_ci == pytest.approx((low, high), rel=1e-4)
