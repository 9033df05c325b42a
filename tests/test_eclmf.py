"""ECLMF and linear CKA on layers with known relations."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity.metrics.curves import bootstrap_counts
from fidelity.metrics.eclmf import cka_replicates, eclmf, linear_cka, resolve_pairs
from fidelity.metrics.readout import readout_scores
from fidelity.metrics.sampling import assign_folds, seeded_generator
from fidelity.probes.capture_types import Capture
from fidelity.schema import TIDY_COLUMNS


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _capture(states: dict, length: int, batch: int) -> Capture:
    tokens = torch.zeros(batch, length, dtype=torch.long)
    return Capture(torch.arange(length), states, tokens, length)


def _layered_capture(batch=2, length=400, d_model=10, seed=0):
    """Layer 0 random; 1 = rotation of 0; 2 = independent noise; 3 = 2 plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, length, d_model, generator=g, dtype=torch.float64) + 0.5
    rotated = base @ _random_orthogonal(d_model, seed + 1) * 3.0
    independent = torch.randn(batch, length, d_model, generator=g, dtype=torch.float64)
    noisy = independent + 0.01 * torch.randn(
        batch, length, d_model, generator=g, dtype=torch.float64
    )
    return _capture({0: base, 1: rotated, 2: independent, 3: noisy}, length, batch)


def _value(frame, metric, source, target):
    row = frame[(frame.metric == metric) & (frame.source_layer == source) & (frame.layer == target)]
    assert len(row) == 1
    return float(row.value.iloc[0])


def test_rotated_layer_is_fully_recoverable_and_independent_layer_is_not():
    cap = _layered_capture()
    anchors = torch.arange(0, 400, 2)
    for centered in (False, True):
        frame = eclmf(
            cap, anchors, pairs=[(0, 1), (0, 2)], n_boot=50, alpha=1e-9, centered=centered
        )
        assert _value(frame, "eclmf", 0, 1) == pytest.approx(1.0, abs=1e-6)
        assert _value(frame, "eclmf_norm", 0, 1) == pytest.approx(1.0, abs=1e-6)
        assert _value(frame, "cka", 0, 1) == pytest.approx(1.0, abs=1e-9)
        assert _value(frame, "eclmf_raw", 0, 1) < 0.9  # rotated: raw cosine misses it
        assert abs(_value(frame, "eclmf_norm", 0, 2)) < 0.05
        assert _value(frame, "cka", 0, 2) < 0.1
    gcv = eclmf(cap, anchors, pairs=[(0, 1)], n_boot=0)
    assert _value(gcv, "eclmf_norm", 0, 1) > 0.999


def test_tidy_schema_for_vertical_metrics():
    cap = _layered_capture(batch=3, length=120)
    frame = eclmf(cap, torch.arange(0, 120, 3), n_boot=20)
    assert tuple(frame.columns) == TIDY_COLUMNS
    assert set(frame.metric) == {"eclmf", "eclmf_chance", "eclmf_norm", "cka", "eclmf_raw"}
    assert (frame.distance == frame.layer - frame.source_layer).all()
    assert set(frame.n) == {3 * 40}
    for column in ("layer", "distance", "n", "source_layer"):
        assert pd.api.types.is_integer_dtype(frame[column])
    pairs = set(zip(frame.source_layer, frame.layer, strict=True))
    assert pairs == {(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)}
    assert ((frame.ci_low <= frame.value + 1e-12) & (frame.value <= frame.ci_high + 1e-12)).all()


def test_raw_variant_is_skipped_when_widths_differ():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(1, 60, 8, generator=g)
    cap = _capture({0: wide, 1: wide[..., :5] * 2}, 60, 1)
    frame = eclmf(cap, torch.arange(60), n_boot=0)
    assert "eclmf_raw" not in set(frame.metric)
    assert _value(frame, "cka", 0, 1) < 1.0


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (None, [(0, 1), (0, 3), (0, 7), (1, 3), (3, 7)]),
        ("adjacent", [(0, 1), (1, 3), (3, 7)]),
        ("from_embedding", [(0, 1), (0, 3), (0, 7)]),
        ("all", [(0, 1), (0, 3), (0, 7), (1, 3), (1, 7), (3, 7)]),
        ([(3, 7), (0, 1)], [(0, 1), (3, 7)]),
    ],
)
def test_resolve_pairs(pairs, expected):
    assert resolve_pairs([0, 3, 1, 7], pairs) == expected


@pytest.mark.parametrize(
    ("layers", "pairs", "message"),
    [
        ([0, 1], "neighbours", "one of"),
        ([1, 2], "from_embedding", "layer 0"),
        ([0, 1], [(1, 0)], "below"),
        ([0, 1], [(0, 5)], "captured layers"),
        ([2], None, "no layer pairs"),
    ],
)
def test_resolve_pairs_rejects_bad_requests(layers, pairs, message):
    with pytest.raises(ValueError, match=message):
        resolve_pairs(layers, pairs)


def test_eclmf_rejects_bad_anchors():
    cap = _layered_capture(batch=1, length=50)
    with pytest.raises(ValueError, match="at least 8"):
        eclmf(cap, torch.arange(4))
    with pytest.raises(ValueError, match="sorted"):
        eclmf(cap, torch.tensor([3, 1, 2, 5, 6, 7, 8, 9]))
    with pytest.raises(TypeError, match="Capture"):
        eclmf({0: torch.zeros(1, 5, 2)}, torch.arange(5))


def test_linear_cka_invariances_and_paths():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(50, 9, generator=g, dtype=torch.float64)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    transformed = 7.0 * X @ _random_orthogonal(6, 5) + 3.0
    assert linear_cka(X, transformed) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), abs=1e-12)
    # n <= width uses the Gram path, n > width the feature path: they must agree
    wide = torch.randn(50, 60, generator=g, dtype=torch.float64)
    via_gram = linear_cka(X, wide)
    Xc, Wc = X - X.mean(0), wide - wide.mean(0)
    direct = (Wc.T @ Xc).square().sum() / ((Xc.T @ Xc).norm() * (Wc.T @ Wc).norm())
    assert via_gram == pytest.approx(float(direct), abs=1e-12)
    assert math.isnan(linear_cka(torch.ones(10, 3), X[:10]))


def test_linear_cka_of_independent_data_is_small():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(2000, 16, generator=g)
    Y = torch.randn(2000, 16, generator=g)
    assert linear_cka(X, Y) < 16 / 2000 * 3  # E[CKA] ~ d / (n + d)


@pytest.mark.parametrize(
    ("X", "Y", "error", "message"),
    [
        (torch.zeros(5, 2), torch.zeros(4, 2), ValueError, "same number of rows"),
        (torch.zeros(1, 2), torch.zeros(1, 2), ValueError, "at least 2"),
        (torch.zeros(5), torch.zeros(5, 2), ValueError, "2-D"),
        (torch.full((5, 2), math.nan), torch.zeros(5, 2), ValueError, "NaN"),
        ("x", torch.zeros(5, 2), TypeError, "torch.Tensor"),
    ],
)
def test_linear_cka_rejects_bad_input(X, Y, error, message):
    with pytest.raises(error, match=message):
        linear_cka(X, Y)


def test_cka_replicates_equal_cka_of_resampled_rows():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(5, 3, generator=g, dtype=torch.float64) + torch.randn(40, 3, generator=g)
    counts = bootstrap_counts(40, 6, seed=0)  # (40, 6)
    replicates = cka_replicates(X, Y, counts)
    for b in range(6):
        rows = torch.from_numpy(np.repeat(np.arange(40), counts[:, b].astype(int)))
        assert replicates[b] == pytest.approx(linear_cka(X[rows], Y[rows]), abs=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    n_anchors=st.integers(8, 60),
    widths=st.lists(st.integers(1, 7), min_size=2, max_size=3),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_vertical_metrics_stay_in_range_on_random_inputs(batch, n_anchors, widths, scale, seed):
    g = torch.Generator().manual_seed(seed)
    states = {
        layer: (torch.randn(batch, n_anchors, width, generator=g) * scale).half()
        for layer, width in enumerate(widths)
    }
    frame = eclmf(_capture(states, n_anchors, batch), torch.arange(n_anchors), pairs="all")
    cosines = frame[frame.metric.isin(["eclmf", "eclmf_chance", "eclmf_raw"])]
    assert cosines.value.between(-1, 1).all()
    cka = frame[frame.metric == "cka"]
    assert cka.value.between(0, 1).all()
    assert cka.dropna(subset=["ci_low"]).ci_low.between(0, 1).all()


def test_cka_interval_is_a_jackknife_that_tightens_with_more_anchors():
    widths = []
    for length in (64, 512):
        cap = _layered_capture(batch=1, length=length, d_model=6, seed=8)
        cka = eclmf(cap, torch.arange(length), pairs=[(0, 3)], n_boot=10)
        row = cka[cka.metric == "cka"].iloc[0]
        assert row.ci_low <= row.value <= row.ci_high
        widths.append(row.ci_high - row.ci_low)
    assert widths[1] < 0.6 * widths[0]


def test_cka_interval_skipped_with_a_warning_for_many_samples():
    cap = _layered_capture(batch=3, length=700, d_model=4, seed=9)
    with pytest.warns(UserWarning, match="CKA interval skipped"):
        frame = eclmf(cap, torch.arange(700), pairs=[(0, 1)], n_boot=5)
    cka = frame[frame.metric == "cka"].iloc[0]
    assert cka.value == pytest.approx(1.0) and math.isnan(cka.ci_low)
    assert not frame[frame.metric == "eclmf"].ci_low.isna().any()


# --- missing samples: NaN states are positions absent from a layer (DeciMamba captures) ---


def _with_holes(cap, holes):
    """``cap`` with ``holes[layer]`` `(batch, length)` bool positions set to NaN."""
    states = dict(cap.states)
    for layer, missing in holes.items():
        states[layer] = states[layer].clone()
        states[layer][missing] = torch.nan
    return Capture(cap.positions, states, cap.tokens, cap.length)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eclmf_with_holes_equals_eclmf_of_the_explicitly_filtered_samples(batch, dtype):
    """Float64 on the same samples; only summation order differs (bound 1e-14)."""
    length, seed = 240, 3
    full = _layered_capture(batch=batch, length=length, d_model=6, seed=batch)
    full = Capture(
        full.positions, {k: v.to(dtype) for k, v in full.states.items()}, full.tokens, length
    )
    g = torch.Generator().manual_seed(batch)
    kept_1 = torch.rand(batch, length, generator=g) > 0.3
    kept_3 = kept_1 & (torch.rand(batch, length, generator=g) > 0.4)  # nested, as decimation
    cap = _with_holes(full, {1: ~kept_1, 3: ~kept_3})
    anchors = torch.arange(0, length, 2)
    pairs = [(0, 1), (1, 2), (1, 3), (0, 2)]  # (1, 2): holes in the source only
    frame = eclmf(cap, anchors, pairs=pairs, n_boot=30, seed=seed, alpha=1e-6)
    folds = assign_folds(len(anchors), 2, seeded_generator(seed))
    kept = {0: torch.ones_like(kept_1), 1: kept_1, 2: torch.ones_like(kept_1), 3: kept_3}
    for source, target in pairs:
        present = (kept[source] & kept[target])[:, anchors]  # (batch, n_anchors)
        rows, index = present.nonzero(as_tuple=True)  # the present samples, row-major
        x = cap.states[target].double()[:, anchors][rows, index]  # (m, d)
        y = cap.states[source].double()[:, anchors][rows, index]
        scores = readout_scores(
            x[None], y[None], folds[index], 1e-6, seeded_generator(seed, source, target)
        )
        per_anchor = torch.stack(
            [scores.score[0][index == a].mean() for a in index.unique()]
        )  # (anchors with a sample,)
        got = frame[(frame.source_layer == source) & (frame.layer == target)].set_index("metric")
        assert set(got.n) == {len(index)}
        assert got.loc["eclmf", "value"] == pytest.approx(float(per_anchor.mean()), abs=1e-14)
        assert got.loc["cka", "value"] == pytest.approx(linear_cka(y, x), abs=1e-14)
        cosines = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        raw = torch.stack([cosines[index == a].mean() for a in index.unique()])
        assert got.loc["eclmf_raw", "value"] == pytest.approx(float(raw.mean()), abs=1e-14)
        if batch == 1:
            # CKA's jackknife does not depend on folds: the same as a capture of only the
            # anchors whose pair exists
            keep = anchors[present[0]]
            filtered = Capture(
                keep, {k: v[:, keep] for k, v in cap.states.items()}, cap.tokens, length
            )
            plain = eclmf(
                filtered, keep, pairs=[(source, target)], n_boot=30, seed=seed, alpha=1e-6
            )
            plain = plain.set_index("metric")
            for column in ("value", "ci_low", "ci_high"):
                assert got.loc["cka", column] == pytest.approx(plain.loc["cka", column], abs=1e-12)
    # the pair without holes is untouched: identical to the capture without any
    whole = eclmf(full, anchors, pairs=pairs, n_boot=30, seed=seed, alpha=1e-6)
    hole_free = (frame.source_layer == 0) & (frame.layer == 2)
    pd.testing.assert_frame_equal(
        frame[hole_free].reset_index(drop=True),
        whole[(whole.source_layer == 0) & (whole.layer == 2)].reset_index(drop=True),
        check_exact=True,
    )


def test_pairs_without_enough_present_anchors_are_skipped_with_a_warning():
    cap = _layered_capture(batch=1, length=100)
    missing = torch.arange(100)[None] >= 9  # layer 3 holds positions 0..8 only
    with pytest.warns(UserWarning, match=r"skipped layer pairs \[\(2, 3\)\]"):
        frame = eclmf(_with_holes(cap, {3: missing}), torch.arange(0, 100, 2), "adjacent")
    assert set(zip(frame.source_layer, frame.layer, strict=True)) == {(0, 1), (1, 2)}
