"""ETMF's table takes every layer of a distance at once (row-wise means and intervals); it must
equal the per-cell computation it replaced, kept here as the reference."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fidelity.metrics.curves import (
    bootstrap_counts,
    mean_with_interval,
    normalized_rows_with_interval,
    normalized_with_interval,
    rows_with_interval,
)
from fidelity.metrics.etmf import EtmfPerAnchor, etmf_frame
from fidelity.metrics.toolkit import tidy_frame


def _reference_frame(result, n_boot, seed, level=0.95):
    """The former etmf_frame: one call per (distance, layer, metric)."""
    rows = []
    for j, distance in enumerate(result.distances.tolist()):
        valid = int(result.n_valid[j])
        if valid == 0:
            continue
        counts = bootstrap_counts(valid, n_boot, [seed, distance]) if n_boot else None
        for i, layer in enumerate(result.layers):
            n = int(result.n_samples[i, j])
            if n == 0:
                continue
            score = result.score[i, j, :valid].numpy()
            chance = result.chance[i, j, :valid].numpy()
            values = {
                "etmf": mean_with_interval(score, counts, level),
                "etmf_chance": mean_with_interval(chance, counts, level),
                "etmf_norm": normalized_with_interval(score, chance, counts, level),
            }
            if result.accuracy is not None:
                values["etmf_acc"] = mean_with_interval(
                    result.accuracy[i, j, :valid].numpy(), counts, level
                )
            rows.extend(
                (metric, layer, distance, value, low, high, n, layer)
                for metric, (value, low, high) in values.items()
            )
            n_raw = int(result.n_raw_samples[i, j])
            if n_raw:
                raw = mean_with_interval(result.raw[i, j, :valid].numpy(), counts, level)
                rows.append(("etmf_raw", layer, distance, *raw, n_raw, layer))
    return tidy_frame(rows)


def _random_result(seed, with_accuracy):
    """Per-anchor values with a valid prefix per distance, NaN holes (missing samples), a
    skipped distance, a skipped cell, a cell without raw values and one with a single sample."""
    g = torch.Generator().manual_seed(seed)
    layers, distances, n_anchors = [0, 1, 2, 3], torch.tensor([0, 1, 4, 30, 90]), 60
    shape = (len(layers), len(distances), n_anchors)
    score = torch.rand(shape, generator=g, dtype=torch.float64)
    chance = 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)
    raw = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    accuracy = (torch.rand(shape, generator=g) > 0.5).double() if with_accuracy else None
    n_valid = torch.tensor([60, 58, 50, 20, 0])
    for tensor in (score, chance, raw, accuracy):
        if tensor is None:
            continue
        holes = torch.rand(shape, generator=g) < 0.1
        tensor[holes] = math.nan
        for j, valid in enumerate(n_valid.tolist()):
            tensor[:, j, valid:] = math.nan
    n_samples = torch.full((len(layers), len(distances)), 7)
    n_samples[:, 4] = 0
    n_samples[2, 1] = 0  # a skipped cell
    score[2, 1], chance[2, 1] = math.nan, math.nan
    score[1, 2, 1:], chance[1, 2, 1:] = math.nan, math.nan  # one sample: degenerate interval
    n_raw = n_samples.clone()
    n_raw[3, 0] = 0
    raw[3, 0] = math.nan
    return EtmfPerAnchor(
        layers,
        distances,
        torch.arange(n_anchors),
        score,
        chance,
        raw,
        accuracy,
        n_valid,
        1,
        n_samples,
        n_raw,
    )


@pytest.mark.parametrize(("seed", "with_accuracy", "n_boot"), [(0, True, 200), (1, False, 50)])
def test_frame_equals_the_per_cell_reference(seed, with_accuracy, n_boot):
    result = _random_result(seed, with_accuracy)
    fast = etmf_frame(result, n_boot=n_boot, seed=seed)
    reference = _reference_frame(result, n_boot, seed)
    assert len(fast) > 50
    pd.testing.assert_frame_equal(
        fast.drop(columns=["value", "ci_low", "ci_high"]),
        reference.drop(columns=["value", "ci_low", "ci_high"]),
    )
    # the same sums in the same order: bit for bit
    for column in ("value", "ci_low", "ci_high"):
        np.testing.assert_array_equal(fast[column], reference[column])
    assert fast["value"].notna().mean() > 0.9


def test_rows_equal_the_one_row_functions():
    g = np.random.default_rng(4)
    values = g.random((6, 40))
    values[g.random((6, 40)) < 0.3] = np.nan
    values[5] = np.nan  # a row without any value
    chance = 0.5 * g.random((6, 40))
    counts = bootstrap_counts(40, 100, 9)
    rows = rows_with_interval(values, counts)
    normalized = normalized_rows_with_interval(values, chance, counts)
    for r in range(6):
        np.testing.assert_allclose(rows[r], mean_with_interval(values[r], counts), rtol=1e-12)
        np.testing.assert_allclose(
            normalized[r], normalized_with_interval(values[r], chance[r], counts), rtol=1e-12
        )
    assert np.isnan(rows[5]).all()
    no_interval = rows_with_interval(values, None)
    np.testing.assert_allclose(no_interval[:, 0], rows[:, 0])
    assert np.isnan(no_interval[:, 1:]).all()


def test_no_rows():
    counts = bootstrap_counts(5, 10, 0)
    assert rows_with_interval(np.empty((0, 5)), counts).shape == (0, 3)
    assert normalized_rows_with_interval(np.empty((0, 5)), np.empty((0, 5)), counts).shape == (0, 3)
