"""Forgetting-curve statistics (farthest, peak, mass, contiguous), fits, bootstrap intervals."""

import math

import numpy as np
import pytest
import torch

from fidelity.metrics.curves import (
    DECAY_MIN_R2,
    _row_intervals,
    bootstrap_counts,
    contiguous_length,
    farthest_distance,
    fit_exponential,
    fit_r2,
    is_decaying,
    mean_with_interval,
    memory_mass,
    normalize,
    normalized_with_interval,
    peak_distance,
    percentile_interval,
    present_mean,
    summarize_curve,
)

DISTANCES = np.array([0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128])


@pytest.mark.parametrize(
    ("a", "tau", "c"),
    [(0.8, 12.0, 0.1), (1.0, 3.0, 0.0), (-0.5, 40.0, 0.7), (2.0, 500.0, -1.0), (0.3, 1.5, 0.02)],
)
def test_fit_exponential_recovers_noiseless_parameters(a, tau, c):
    fit = fit_exponential(DISTANCES, a * np.exp(-DISTANCES / tau) + c)
    assert fit.converged
    assert fit.a == pytest.approx(a, rel=1e-6, abs=1e-9)
    assert fit.tau == pytest.approx(tau, rel=1e-6)
    assert fit.c == pytest.approx(c, rel=1e-6, abs=1e-9)
    assert fit.half_life == pytest.approx(tau * math.log(2), rel=1e-6)


def test_fit_exponential_with_offset_distances_and_nan_and_tensors():
    d = DISTANCES + 7
    values = 0.6 * np.exp(-d / 9.0) + 0.2
    values[3] = np.nan  # a distance without an estimate is ignored
    fit = fit_exponential(torch.from_numpy(d), torch.from_numpy(values))
    assert fit.converged
    assert (fit.a, fit.tau, fit.c) == pytest.approx((0.6, 9.0, 0.2), rel=1e-6)


def test_fit_exponential_flags_curves_without_a_measurable_decay():
    assert not fit_exponential(DISTANCES, np.full(DISTANCES.size, 0.3)).converged
    spike = fit_exponential(DISTANCES, (DISTANCES == 0).astype(float))  # gone after one step
    assert not spike.converged and spike.tau < 0.01
    assert not fit_exponential(DISTANCES, 1 - DISTANCES / 1e6).converged  # no curvature


@pytest.mark.parametrize(
    ("distances", "values", "message"),
    [
        ([0, 1], [1.0, 0.5], ">= 3 distinct"),
        ([0, 1, 2, 3], [1.0, np.nan, np.nan, 0.2], ">= 3 distinct"),
        ([0, 1, 2], [1.0, 0.5], "same length"),
        ([[0, 1, 2]], [[1.0, 0.5, 0.2]], "1-D"),
    ],
)
def test_fit_exponential_rejects_bad_input(distances, values, message):
    with pytest.raises(ValueError, match=message):
        fit_exponential(distances, values)


@pytest.mark.parametrize(
    ("distances", "values", "expected"),
    [
        ([0, 1, 2, 4, 8], [1.0, 0.8, 0.6, 0.4, 0.7], 2),  # later recovery does not count
        ([0, 1, 2, 4], [0.4, 0.9, 0.9, 0.9], 0),  # first distance already below
        ([0, 1, 2, 4], [1.0, 0.9, 0.8, 0.6], 4),  # never below: the largest distance probed
        ([4, 0, 2, 1], [0.1, 1.0, 0.5, 0.7], 2),  # any order; exactly 0.5 still counts
        ([0, 1, 2, 4, 8], [1.0, np.nan, 0.7, np.nan, 0.2], 2),  # NaN entries skipped
    ],
)
def test_contiguous_length_on_hand_made_curves(distances, values, expected):
    assert contiguous_length(distances, values) == expected


def test_contiguous_length_threshold_and_errors():
    assert contiguous_length([0, 1, 2], [1.0, 0.8, 0.6], threshold=0.7) == 1
    with pytest.raises(ValueError, match="n_dist=2"):
        contiguous_length([0, 1], [1.0])


# A layer that copies at lag 8: the token is back at d = 8 after dipping at d = 1.
LAG_8 = ([0, 1, 2, 4, 6, 8, 10, 16, 32], [1.0, 0.02, -0.01, 0.03, 0.1, 0.93, 0.2, 0.0, 0.01])


@pytest.mark.parametrize(
    ("distances", "values", "farthest", "peak"),
    [
        (*LAG_8, 8, 8),
        ([0, 1, 2, 4, 8], [1.0, 0.8, 0.6, 0.4, 0.7], 8, 1),  # recovers: farthest counts it
        ([0, 1, 2, 4], [0.4, 0.3, 0.2, 0.1], 0, 1),  # never at 0.5: farthest 0
        ([0, 1, 2, 4], [1.0, 0.9, 0.8, 0.6], 4, 1),  # the largest distance probed (lower bound)
        ([4, 0, 2, 1], [0.5, 1.0, 0.2, 0.3], 4, 4),  # any order; exactly 0.5 counts
        ([0, 1, 2, 4, 8], [1.0, np.nan, 0.2, 0.6, np.nan], 4, 4),  # NaN entries skipped
        ([0, 1, 2, 4], [1.0, 0.7, 0.7, 0.1], 2, 1),  # ties: the first distance
    ],
)
def test_farthest_and_peak_distance_on_hand_made_curves(distances, values, farthest, peak):
    assert farthest_distance(distances, values) == farthest
    assert peak_distance(distances, values) == peak


def test_lag_curve_has_no_contiguous_memory_and_no_half_life():
    distances, values = LAG_8
    assert contiguous_length(distances, values) == 0
    fit = fit_exponential(distances, values)
    r2 = fit_r2(distances, values, fit)
    assert r2 < DECAY_MIN_R2 and not is_decaying(fit, r2)


def test_peak_needs_a_distance_beyond_zero_and_a_value_above_noise():
    assert math.isnan(peak_distance([0], [1.0]))
    assert math.isnan(peak_distance([0, 1, 2], [1.0, np.nan, np.nan]))
    at_chance = [1.0, 0.02, -0.03, 0.08, 0.01]  # the maximum of noise is not a peak
    assert math.isnan(peak_distance([0, 1, 2, 4, 8], at_chance))
    assert peak_distance([0, 1, 2, 4, 8], at_chance, floor=0.05) == 4


def test_memory_mass_is_the_area_over_log2_distance():
    d = np.array([0, 1, 2, 4, 8, 16, 32])
    assert memory_mass(d, np.ones(d.size)) == pytest.approx(5.0)  # perfect up to 32: log2(32)
    assert memory_mass(d, np.zeros(d.size)) == 0.0
    # the value at d = 0 does not count; a spike at one distance counts its neighbourhood
    spike = np.array([1.0, 0, 0, 1.0, 0, 0, 0])
    assert memory_mass(d, spike) == pytest.approx(1.0)  # triangle of base 2 doublings
    # a missing distance is left out and its neighbours joined (linear in log-distance)
    gap = np.array([9.0, 1.0, np.nan, 1.0, 1.0, 0.5, 0.5])
    assert memory_mass(d, gap) == pytest.approx(2 + 1 + 0.75 + 0.5)
    assert math.isnan(memory_mass([0, 1], [1.0, 1.0]))  # one distance >= 1: no area


def test_vectorized_statistics_match_column_by_column():
    rng = np.random.default_rng(7)
    curves = rng.uniform(-0.2, 1.2, (DISTANCES.size, 40))
    curves[rng.random(curves.shape) < 0.1] = np.nan
    for statistic in (farthest_distance, contiguous_length, peak_distance, memory_mass):
        together = statistic(DISTANCES, curves)
        one_by_one = [statistic(DISTANCES, column) for column in curves.T]
        np.testing.assert_allclose(together, one_by_one, rtol=1e-12, equal_nan=True)


def test_fit_r2_and_decay_rule():
    values = 0.8 * np.exp(-DISTANCES / 12.0) + 0.1
    fit = fit_exponential(DISTANCES, values)
    assert fit_r2(DISTANCES, values, fit) == pytest.approx(1.0, abs=1e-9)
    assert is_decaying(fit, fit_r2(DISTANCES, values, fit))
    rising = 1 - values
    rising_fit = fit_exponential(DISTANCES, rising)
    assert rising_fit.a < 0 and not is_decaying(rising_fit, fit_r2(DISTANCES, rising, rising_fit))
    assert math.isnan(fit_r2(DISTANCES, np.full(DISTANCES.size, 0.3), fit))  # no variance
    assert not is_decaying(None, 1.0)


def test_bootstrap_counts_are_the_draws_counted():
    """Counting by bincount gives exactly what counting each draw one by one gives."""
    counts = bootstrap_counts(37, 25, seed=[1, 2])
    draws = np.random.default_rng([1, 2]).integers(0, 37, size=(25, 37))
    expected = np.zeros((25, 37))
    np.add.at(expected, (np.arange(25)[:, None], draws), 1.0)
    np.testing.assert_array_equal(counts, expected.T)


def test_discrete_percentile_interval_returns_sample_values():
    samples = np.array([8.0] * 90 + [6.0] * 5 + [10.0] * 5)
    low, high = percentile_interval(samples, level=0.95, discrete=True)
    assert (low, high) == (6.0, 10.0)
    assert percentile_interval(np.full(50, 8.0), discrete=True) == (8.0, 8.0)


def test_bootstrap_counts_and_percentile_interval():
    counts = bootstrap_counts(50, 30, seed=[3, 4])
    assert counts.shape == (50, 30)
    assert np.all(counts.sum(axis=0) == 50) and np.all(counts >= 0)
    assert np.array_equal(counts, bootstrap_counts(50, 30, seed=[3, 4]))
    assert not np.array_equal(counts, bootstrap_counts(50, 30, seed=[3, 5]))
    assert percentile_interval(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(x) for x in percentile_interval(np.array([np.nan])))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.arange(3.0), level=1.5)


def test_normalize_and_mean_intervals():
    assert normalize(0.75, 0.5) == pytest.approx(0.5)
    assert np.isnan(normalize(0.9, 1.0))
    rng = np.random.default_rng(0)
    score, chance = rng.normal(0.6, 0.1, 400), rng.normal(0.2, 0.1, 400)
    counts = bootstrap_counts(400, 300, seed=1)
    mean, low, high = mean_with_interval(score, counts)
    assert mean == pytest.approx(score.mean()) and low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * score.std() / 20, rel=0.25)  # ~ +-1.96 SE
    value, low, high = normalized_with_interval(score, chance, counts)
    assert value == pytest.approx((score.mean() - chance.mean()) / (1 - chance.mean()))
    assert low < value < high
    assert all(math.isnan(x) for x in mean_with_interval(score, None)[1:])


def _noisy_curve(a, tau, c, n_anchors, noise, seed):
    rng = np.random.default_rng(seed)
    truth = a * np.exp(-DISTANCES / tau) + c
    return truth, truth[:, None] + rng.normal(0, noise, (DISTANCES.size, n_anchors))


def test_summarize_curve_intervals_contain_the_truth():
    a, tau, c = 0.9, 10.0, 0.05
    truth, scores = _noisy_curve(a, tau, c, n_anchors=512, noise=0.3, seed=0)
    scores[DISTANCES > 60, 400:] = np.nan  # far distances: fewer valid anchors
    summary = summarize_curve(DISTANCES, scores, n_boot=200, seed=0)
    assert summary.decaying and summary.r2 > 0.95
    low, high = summary.half_life_ci
    assert low < tau * math.log(2) < high
    assert high - low < 2.0
    true_length = contiguous_length(DISTANCES, truth)
    assert summary.contiguous.low <= true_length <= summary.contiguous.high
    assert summary.contiguous.value == true_length
    assert summary.farthest.low <= farthest_distance(DISTANCES, truth) <= summary.farthest.high
    assert summary.peak.value == summary.peak.low == 1 and summary.peak.high <= 2
    assert summary.mass.low < memory_mass(DISTANCES, truth) < summary.mass.high
    assert summary.n_boot_converged == 200
    assert summary.half_life == pytest.approx(tau * math.log(2), rel=0.1)


def test_summarize_curve_of_a_lag_curve_names_the_lag_and_no_half_life():
    """Normalized score 0.9 at lag 8 and chance elsewhere (beyond d = 0), noisy anchors."""
    rng = np.random.default_rng(3)
    truth = np.where(DISTANCES == 8, 0.9, 0.0)
    truth[0] = 1.0
    scores = truth[:, None] + rng.normal(0, 0.3, (DISTANCES.size, 300))
    summary = summarize_curve(DISTANCES, scores, n_boot=200, seed=1)
    assert (summary.peak.value, summary.peak.low, summary.peak.high) == (8, 8, 8)
    assert summary.peak_value == pytest.approx(0.9, abs=0.06)
    assert (summary.farthest.value, summary.farthest.low, summary.farthest.high) == (8, 8, 8)
    assert summary.contiguous.value == 0
    assert not summary.decaying and math.isnan(summary.half_life)
    assert not summary.r2 >= DECAY_MIN_R2 and summary.n_boot_converged == 0  # NaN: no fit
    assert all(math.isnan(x) for x in summary.half_life_ci)
    assert summary.mass.low < memory_mass(DISTANCES, truth) < summary.mass.high


def test_summarize_curve_normalizes_with_chance():
    rng = np.random.default_rng(1)
    chance = 0.4 + rng.normal(0, 0.05, (DISTANCES.size, 300))
    normalized = 0.8 * np.exp(-DISTANCES / 20.0)
    scores = chance + normalized[:, None] * (1 - chance)
    summary = summarize_curve(DISTANCES, scores, chance, n_boot=0)
    expected = normalize(scores.mean(axis=1), chance.mean(axis=1))
    np.testing.assert_allclose(summary.curve, expected, atol=1e-12)
    assert summary.fit.tau == pytest.approx(20.0, rel=0.02)
    assert all(math.isnan(x) for x in summary.half_life_ci)
    assert math.isnan(summary.farthest.low) and math.isnan(summary.mass.high)


def test_summarize_curve_without_enough_distances_for_a_fit():
    scores = np.full((DISTANCES.size, 20), np.nan)
    scores[:2] = [[1.0], [0.7]]
    summary = summarize_curve(DISTANCES, scores, n_boot=10)
    assert summary.fit is None and math.isnan(summary.r2) and not summary.decaying
    assert summary.farthest.value == 1 and summary.contiguous.value == 1
    assert summary.peak.value == 1 and math.isnan(summary.mass.value)


def test_summarize_curve_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_dist"):
        summarize_curve(DISTANCES, np.zeros((3, 10)))
    with pytest.raises(ValueError, match="must match"):
        summarize_curve(DISTANCES, np.zeros((DISTANCES.size, 10)), np.zeros((DISTANCES.size, 9)))
    with pytest.raises(ValueError, match="n_boot"):
        summarize_curve(DISTANCES, np.zeros((DISTANCES.size, 10)), n_boot=-1)
    with pytest.raises(ValueError, match="no finite value"):
        summarize_curve(DISTANCES, np.full((DISTANCES.size, 10), np.nan))


def test_intervals_without_missing_anchors_are_the_plain_means_bit_for_bit():
    """NaN-aware means reduce exactly to ``values @ counts / n`` when nothing is missing."""
    rng = np.random.default_rng(4)
    score, chance = rng.normal(0.6, 0.1, 300), rng.normal(0.2, 0.1, 300)
    counts = bootstrap_counts(300, 100, seed=2)
    plain = percentile_interval(score @ counts / score.size)
    assert mean_with_interval(score, counts) == (float(score.mean()), *plain)
    plain_norm = normalize(score @ counts / 300, chance @ counts / 300)
    assert normalized_with_interval(score, chance, counts) == (
        float(normalize(score.mean(), chance.mean())),
        *percentile_interval(plain_norm),
    )


def test_missing_anchors_are_left_out_of_means_and_replicates():
    rng = np.random.default_rng(5)
    score, chance = rng.normal(0.6, 0.1, 200), rng.normal(0.2, 0.1, 200)
    score[rng.random(200) < 0.3] = np.nan
    chance[:10] = np.nan  # an anchor missing in either is missing in both
    present = ~np.isnan(score) & ~np.isnan(chance)
    counts = bootstrap_counts(200, 150, seed=3)
    mean, low, high = mean_with_interval(score, counts)
    kept = ~np.isnan(score)
    assert mean == pytest.approx(score[kept].mean(), abs=1e-15)
    # a replicate is the mean of the drawn anchors that have a value, repeats counted
    replicates = (np.nan_to_num(score) @ counts) / (kept.astype(float) @ counts)
    assert (low, high) == pytest.approx(percentile_interval(replicates), abs=1e-15)
    value, low, high = normalized_with_interval(score, chance, counts)
    s, c = score[present], chance[present]
    assert value == pytest.approx((s.mean() - c.mean()) / (1 - c.mean()), abs=1e-15)
    weights = present.astype(float) @ counts
    expected = normalize(
        np.where(present, score, 0) @ counts / weights,
        np.where(present, chance, 0) @ counts / weights,
    )
    assert (low, high) == pytest.approx(percentile_interval(expected), abs=1e-15)
    assert all(math.isnan(x) for x in mean_with_interval(np.full(5, np.nan), counts[:5]))
    assert all(math.isnan(x) for x in normalized_with_interval(score[:3], [np.nan] * 3, None))


def test_replicates_that_draw_only_missing_anchors_are_ignored():
    values = np.array([np.nan, 1.0, 3.0])
    counts = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 0.0]])  # (anchors, reps)
    replicates = present_mean(values, counts)
    np.testing.assert_array_equal(replicates, [np.nan, 2.0, 1.0])
    assert mean_with_interval(values, counts, level=0.5) == (2.0, 1.25, 1.75)


def test_row_intervals_equal_the_interval_of_each_row():
    """All-finite rows in one percentile call, the others row by row: the same numbers as
    percentile_interval of each row (non-finite replicates left out)."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        replicates = rng.normal(size=(int(rng.integers(1, 30)), 200)) * 10 ** rng.uniform(-4, 4)
        if trial % 3 == 1:
            replicates[rng.random(replicates.shape) < 0.1] = np.nan
        if trial % 4 == 2:
            replicates[0, :3] = np.inf
            replicates[-1] = np.nan  # no finite replicate: NaN bounds
        bounds = _row_intervals(replicates, 0.9)
        for row, expected in zip(bounds, replicates, strict=True):
            assert np.array_equal(row, percentile_interval(expected, 0.9), equal_nan=True)
