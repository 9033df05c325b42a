"""Forgetting-curve fits, effective memory length and bootstrap intervals."""

import math

import numpy as np
import pytest
import torch

from fidelity.metrics.curves import (
    bootstrap_counts,
    effective_memory_length,
    fit_exponential,
    mean_with_interval,
    normalize,
    normalized_with_interval,
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
def test_effective_memory_length_on_hand_made_curves(distances, values, expected):
    assert effective_memory_length(distances, values) == expected


def test_effective_memory_length_threshold_and_errors():
    assert effective_memory_length([0, 1, 2], [1.0, 0.8, 0.6], threshold=0.7) == 1
    with pytest.raises(ValueError, match="same length"):
        effective_memory_length([0, 1], [1.0])


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
    low, high = summary.half_life_ci
    assert low < tau * math.log(2) < high
    assert high - low < 2.0
    true_eml = effective_memory_length(DISTANCES, truth)
    assert summary.eml_ci[0] <= true_eml <= summary.eml_ci[1]
    assert summary.effective_memory_length == true_eml
    assert summary.n_boot_converged == 200
    assert summary.half_life == pytest.approx(tau * math.log(2), rel=0.1)


def test_summarize_curve_normalizes_with_chance():
    rng = np.random.default_rng(1)
    chance = 0.4 + rng.normal(0, 0.05, (DISTANCES.size, 300))
    normalized = 0.8 * np.exp(-DISTANCES / 20.0)
    scores = chance + normalized[:, None] * (1 - chance)
    summary = summarize_curve(DISTANCES, scores, chance, n_boot=0)
    expected = normalize(scores.mean(axis=1), chance.mean(axis=1))
    np.testing.assert_allclose(summary.curve, expected, atol=1e-12)
    assert summary.fit.tau == pytest.approx(20.0, rel=0.02)
    assert all(math.isnan(x) for x in summary.half_life_ci + summary.eml_ci)


def test_summarize_curve_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_dist"):
        summarize_curve(DISTANCES, np.zeros((3, 10)))
    with pytest.raises(ValueError, match="must match"):
        summarize_curve(DISTANCES, np.zeros((DISTANCES.size, 10)), np.zeros((DISTANCES.size, 9)))
    with pytest.raises(ValueError, match="n_boot"):
        summarize_curve(DISTANCES, np.zeros((DISTANCES.size, 10)), n_boot=-1)
    with pytest.raises(ValueError, match="fewer than 3"):
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
