"""ETMF on synthetic systems with known answers, plus anchor/distance sampling."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity.metrics.curves import contiguous_length, fit_exponential
from fidelity.metrics.etmf import (
    etmf,
    etmf_frame,
    etmf_per_anchor,
    etmf_summary,
    nearest_token_accuracy,
)
from fidelity.metrics.readout import readout_scores, rowwise_cosine
from fidelity.metrics.sampling import (
    assign_folds,
    default_distances,
    default_min_valid,
    estimate_positions,
    required_positions,
    sample_anchors,
    seeded_generator,
)
from fidelity.probes.capture_types import Capture
from fidelity.schema import TIDY_COLUMNS


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run this module's torch ops on one thread, restoring the setting afterwards.

    On a shared 2-core machine, two OpenMP threads competing with other processes made the
    recurrence tests ~10x slower (31 s instead of 2.5 s); results do not depend on it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokens_and_embedding(batch, length, d_model, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, d_model, generator=g, dtype=torch.float64) / math.sqrt(d_model)
    tokens = torch.randint(vocab, (batch, length), generator=g)
    return tokens, embedding


def _capture(states: dict, tokens: torch.Tensor) -> Capture:
    length = tokens.shape[1]
    return Capture(torch.arange(length), states, tokens, length)


def _identity_capture(batch=2, length=600, d_model=12, vocab=40, seed=0):
    tokens, embedding = _tokens_and_embedding(batch, length, d_model, vocab, seed)
    e = embedding[tokens]  # (batch, length, d_model)
    return _capture({0: e, 1: e.clone()}, tokens), embedding


def _frame_value(frame, metric, layer, distance):
    row = frame[(frame.metric == metric) & (frame.layer == layer) & (frame.distance == distance)]
    assert len(row) == 1
    return float(row.value.iloc[0])


def _linear_recurrence_capture(a, batch, length, d_model, vocab, seed, burn_in=400):
    """h[1][t] = a * h[1][t-1] + e[t], started ``burn_in`` steps early (stationary)."""
    tokens, embedding = _tokens_and_embedding(batch, length + burn_in, d_model, vocab, seed)
    x = embedding[tokens]  # (batch, burn_in + length, d_model)
    h = torch.zeros(batch, d_model, dtype=torch.float64)
    states = []
    for t in range(length + burn_in):
        h = a * h + x[:, t]
        states.append(h)
    recurrent = torch.stack(states, dim=1)[:, burn_in:]  # (batch, length, d_model)
    return _capture({0: x[:, burn_in:], 1: recurrent}, tokens[:, burn_in:])


RECURRENCE_DISTANCES = torch.tensor(
    [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128, 161, 203, 256]
)


@pytest.mark.parametrize("a", [0.9, 0.97])
def test_linear_recurrence_half_life_matches_ln2_over_minus_ln_a(a):
    """h_t = a h_{t-1} + e_t with i.i.d. random-token embeddings e_t.

    Where the read-out is well estimated, the best linear read-out of e_t from h_{t+d} is
    proportional to h_{t+d} = a^d e_t + (independent rest), so the centred read-out cosine is
    ~ sqrt(1 - a^2) * a^d, chance ~ 0, and normalized ETMF decays at exactly the rate a:
    half-life ln 2 / -ln a. Two things bend the measured curve, and the test avoids them
    rather than hiding them: (i) the cosine is uncentred by default, and a shared mean
    embedding then mixes into the prediction more and more as the read-out shrinks with d
    (so the tail falls faster): the test uses ``centered=True``; (ii) read-out estimation
    noise (~ d_model / n) dominates once the signal is small, making the far tail fall like
    a^(2d): the test uses 65k samples for 16 dimensions and fits the exponential only where
    normalized ETMF is at least a quarter of its d = 0 value (two half-lives).
    The raw variant cos(h_t, h_{t+d}) is the autocorrelation of the process, a^d plus a
    constant from the mean state, and is fitted over all distances.
    """
    length = 4096
    cap = _linear_recurrence_capture(a, batch=16, length=length, d_model=16, vocab=64, seed=0)
    result = etmf_per_anchor(
        cap, torch.arange(length), RECURRENCE_DISTANCES, layers=[1], centered=True
    )
    frame = etmf_frame(result, n_boot=0)
    expected = math.log(2) / -math.log(a)

    normalized = frame[(frame.metric == "etmf_norm") & (frame.layer == 1)]
    d, v = normalized.distance.to_numpy(), normalized.value.to_numpy()
    window = v >= 0.25 * v[0]
    assert window.sum() >= 8
    fit = fit_exponential(d[window], v[window])
    assert fit.converged
    assert fit.half_life == pytest.approx(expected, rel=0.10)
    assert abs(fit.c) < 0.05

    raw = frame[(frame.metric == "etmf_raw") & (frame.layer == 1)]
    raw_fit = fit_exponential(raw.distance.to_numpy(), raw.value.to_numpy())
    assert raw_fit.converged
    assert raw_fit.half_life == pytest.approx(expected, rel=0.10)


def test_uncentred_etmf_understates_the_half_life_when_embeddings_share_a_mean():
    """The documented bias of the default (uncentred) cosine on the same recurrence.

    With 64 tokens the embeddings have a non-zero mean; unrelated pairs then score well above
    0 (chance ~0.13), and the normalized curve falls about 30% faster than a^d at a = 0.97
    (the centred variant matches a^d: see the test above).
    """
    a, length = 0.97, 4096
    cap = _linear_recurrence_capture(a, batch=8, length=length, d_model=16, vocab=64, seed=1)
    distances = RECURRENCE_DISTANCES[RECURRENCE_DISTANCES <= 64]
    frame = etmf_frame(etmf_per_anchor(cap, torch.arange(length), distances, [1]), n_boot=0)
    assert (frame[frame.metric == "etmf_chance"].value > 0.08).all()
    normalized = frame[frame.metric == "etmf_norm"]
    d, v = normalized.distance.to_numpy(), normalized.value.to_numpy()
    window = v >= 0.25 * v[0]
    expected = math.log(2) / -math.log(a)
    assert 0.4 * expected < fit_exponential(d[window], v[window]).half_life < 0.8 * expected


def test_etmf_summary_of_linear_recurrence():
    cap = _linear_recurrence_capture(0.9, batch=4, length=1024, d_model=8, vocab=64, seed=1)
    result = etmf_per_anchor(cap, torch.arange(0, 1024, 2), RECURRENCE_DISTANCES, layers=[1])
    summary = etmf_summary(result, n_boot=50, seed=0)
    assert list(summary.layer) == [1]
    row = summary.iloc[0]
    assert row.converged and row.decaying and row.half_life_r2 > 0.9
    assert row.n_boot_converged > 40
    assert row.half_life_low <= row.half_life <= row.half_life_high
    assert 1.0 < row.half_life < 10.0  # the tail is noise-limited here: only bounds are checked
    assert row.contiguous_length == 0  # normalized ETMF is ~0.4 already at d = 0
    assert row.farthest_distance == 0 and row.peak_distance == 1
    assert row.memory_mass_low <= row.memory_mass <= row.memory_mass_high


def test_identity_model_reads_token_exactly_at_zero_and_chance_far_away():
    cap, embedding = _identity_capture(batch=2, length=600, d_model=12, vocab=40, seed=0)
    distances = torch.tensor([0, 1, 3, 50, 200])
    for centered in (False, True):
        frame = etmf(
            cap,
            torch.arange(600),
            distances,
            embedding=embedding,
            alpha=1e-9,
            n_boot=0,
            centered=centered,
        )
        assert _frame_value(frame, "etmf", 1, 0) == pytest.approx(1.0, abs=1e-6)
        assert _frame_value(frame, "etmf_norm", 1, 0) == pytest.approx(1.0, abs=1e-6)
        assert _frame_value(frame, "etmf_acc", 1, 0) == 1.0
        assert _frame_value(frame, "etmf_raw", 1, 0) == pytest.approx(1.0, abs=1e-12)
        for distance in (1, 3, 50, 200):
            assert abs(_frame_value(frame, "etmf_norm", 1, distance)) < 0.05
            assert _frame_value(frame, "etmf_acc", 1, distance) < 0.15  # 1/40 by chance


def test_identity_model_with_gcv_alpha_is_exact_too():
    cap, _ = _identity_capture(batch=1, length=400, d_model=8, vocab=30, seed=1)
    frame = etmf(cap, torch.arange(400), torch.tensor([0, 100]), n_boot=0)
    assert _frame_value(frame, "etmf", 1, 0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shift", [3, 10])
def test_copy_model_peaks_at_the_copy_distance(shift):
    """h[1][t] = e[t - k] (fresh random vectors before t = k): token t sits at t + k."""
    batch, length, d_model = 2, 500, 10
    tokens, embedding = _tokens_and_embedding(batch, length, d_model, 50, seed=2)
    e = embedding[tokens]
    head = torch.randn(batch, shift, d_model, generator=torch.Generator().manual_seed(3))
    copied = torch.cat([head.double(), e[:, :-shift]], dim=1)  # (batch, length, d_model)
    cap = _capture({0: e, 1: copied}, tokens)
    distances = torch.tensor(sorted({0, 1, shift - 1, shift, shift + 1, 2 * shift, 40}))
    frame = etmf(cap, torch.arange(length), distances, n_boot=0, alpha=1e-9)
    normalized = frame[(frame.metric == "etmf_norm") & (frame.layer == 1)].set_index("distance")
    assert normalized.value.idxmax() == shift
    assert normalized.value[shift] == pytest.approx(1.0, abs=1e-6)
    others = normalized.value.drop(index=shift)
    assert others.abs().max() < 0.05
    result = etmf_per_anchor(cap, torch.arange(length), distances, layers=[1], alpha=1e-9)
    row = etmf_summary(result, n_boot=50).iloc[0]
    assert (row.peak_distance, row.peak_distance_low, row.peak_distance_high) == (
        shift,
        shift,
        shift,
    )
    assert row.farthest_distance == row.farthest_distance_low == shift
    assert row.peak_value == pytest.approx(1.0, abs=1e-6)
    assert row.contiguous_length == 0 and not row.decaying and math.isnan(row.half_life)


def test_tidy_schema_and_counts():
    cap, embedding = _identity_capture(batch=3, length=200, d_model=6, vocab=20, seed=4)
    anchors = sample_anchors(200, 64, torch.Generator().manual_seed(0))
    distances = torch.tensor([0, 5, 150])
    frame = etmf(cap, anchors, distances, embedding=embedding, n_boot=20)
    assert tuple(frame.columns) == TIDY_COLUMNS
    assert set(frame.metric) == {"etmf", "etmf_chance", "etmf_norm", "etmf_acc", "etmf_raw"}
    assert (frame.source_layer == frame.layer).all()
    for column in ("layer", "distance", "n", "source_layer"):
        assert pd.api.types.is_integer_dtype(frame[column])
    valid_far = int((anchors + 150 < 200).sum())
    assert set(frame[frame.distance == 150].n) == {3 * valid_far}
    assert set(frame[frame.distance == 0].n) == {3 * 64}
    assert set(frame.layer) == {0, 1}
    finite = frame.dropna(subset=["ci_low"])
    assert len(finite) == len(frame)
    assert (
        (finite.ci_low <= finite.value + 1e-12) & (finite.value <= finite.ci_high + 1e-12)
    ).all()


def test_results_do_not_depend_on_which_other_layers_are_computed():
    cap, _ = _identity_capture(batch=1, length=300, d_model=6, vocab=20, seed=5)
    cap.states[2] = cap.states[1] + 0.1 * torch.randn(1, 300, 6, dtype=torch.float64)
    anchors, distances = torch.arange(0, 300, 3), torch.tensor([0, 4])
    alone = etmf(cap, anchors, distances, layers=[2], n_boot=10, seed=7)
    together = etmf(cap, anchors, distances, n_boot=10, seed=7)
    pd.testing.assert_frame_equal(
        alone.reset_index(drop=True), together[together.layer == 2].reset_index(drop=True)
    )
    different_seed = etmf(cap, anchors, distances, layers=[2], n_boot=10, seed=8)
    assert not np.allclose(different_seed.value, alone.value)


def test_float16_capture_and_subset_of_positions():
    cap, _ = _identity_capture(batch=1, length=400, d_model=8, vocab=30, seed=6)
    anchors = sample_anchors(400, 100, torch.Generator().manual_seed(1))
    distances = torch.tensor([0, 2, 30])
    kept = required_positions(anchors, distances, 400)
    index = cap.index_of(kept)
    sparse = Capture(
        kept,
        {layer: states[:, index].half() for layer, states in cap.states.items()},
        cap.tokens[:, index],
        400,
    )
    frame = etmf(sparse, anchors, distances, n_boot=0, alpha=1e-6)
    assert _frame_value(frame, "etmf", 1, 0) == pytest.approx(1.0, abs=1e-6)


def test_too_few_anchors_skip_the_distance_with_a_warning():
    cap, _ = _identity_capture(batch=1, length=100, d_model=4, vocab=10, seed=7)
    with pytest.warns(UserWarning, match=r"skipped distances \[95\]"):
        result = etmf_per_anchor(cap, torch.arange(100), torch.tensor([0, 95]))
    assert result.n_valid.tolist() == [100, 0]
    assert torch.isnan(result.score[:, 1]).all()
    assert set(etmf_frame(result, n_boot=0).distance) == {0}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"anchors": torch.tensor([5, 3, 9])}, ValueError, "sorted"),
        ({"anchors": torch.tensor([0.0, 1.0])}, ValueError, "integer"),
        ({"anchors": torch.tensor([1, 500])}, ValueError, r"\[0, 200\)"),
        ({"distances": torch.tensor([-1, 2])}, ValueError, "non-negative"),
        ({"distances": torch.tensor([0.5])}, ValueError, "integer"),
        ({"layers": [3]}, ValueError, "not captured"),
        ({"embedding": torch.zeros(10, 5)}, ValueError, "vocab, d_model=6"),
        ({"embedding": torch.zeros(10, 6)}, ValueError, "token ids"),
        ({"embedding": [[0.0] * 6]}, TypeError, "embedding"),
    ],
)
def test_etmf_rejects_bad_arguments(kwargs, error, message):
    cap, _ = _identity_capture(batch=1, length=200, d_model=6, vocab=20, seed=8)
    arguments = {"anchors": torch.arange(0, 200, 2), "distances": torch.tensor([0, 3])}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        etmf(cap, n_boot=0, **arguments)


def test_etmf_needs_embeddings_and_kept_positions():
    cap, _ = _identity_capture(batch=1, length=200, d_model=6, vocab=20, seed=9)
    without_embeddings = Capture(cap.positions, {1: cap.states[1]}, cap.tokens, 200)
    with pytest.raises(ValueError, match="layer 0"):
        etmf(without_embeddings, torch.arange(50), torch.tensor([0]))
    anchors = torch.arange(0, 100, 4)
    sparse = Capture(anchors, {k: v[:, anchors] for k, v in cap.states.items()}, cap.tokens, 200)
    with pytest.raises(ValueError, match="required_positions"):
        etmf(sparse, anchors, torch.tensor([0, 1]))


def test_nearest_token_accuracy():
    embedding = torch.eye(4)
    prediction = torch.tensor([[0.9, 0.1, 0, 0], [0, 0, 0, 2.0], [1.0, 1.1, 0, 0]])
    hits = nearest_token_accuracy(prediction, torch.tensor([0, 2, 1]), embedding)
    assert hits.tolist() == [True, False, True]


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(40, 120),
    d_model=st.integers(1, 9),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_metrics_stay_in_range_on_random_inputs(batch, length, d_model, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, (batch, length), generator=g)
    states = {
        layer: (torch.randn(batch, length, d_model, generator=g) * scale + offset).half()
        for layer in range(3)
    }
    cap = _capture(states, tokens)
    embedding = torch.randn(5, d_model, generator=g)
    frame = etmf(cap, torch.arange(length), torch.tensor([0, 1, 7, 30]), embedding=embedding)
    cosines = frame[frame.metric.isin(["etmf", "etmf_chance", "etmf_raw"])]
    assert cosines.value.between(-1, 1).all()
    accuracy = frame[frame.metric == "etmf_acc"]
    assert accuracy.value.between(0, 1).all()
    bounded = frame[frame.metric != "etmf_norm"].dropna(subset=["ci_low"])
    assert bounded.ci_low.between(-1, 1).all() and bounded.ci_high.between(-1, 1).all()


# --- missing samples: NaN states are positions absent from a layer (DeciMamba captures) ---


def _recurrence_with_embedding(batch, length, d_model, vocab, seed, dtype=torch.float64):
    """Layer 0: embeddings; layer 1: ``h_t = 0.8 h_(t-1) + e_t``; layer 2: ``h`` plus noise."""
    tokens, embedding = _tokens_and_embedding(batch, length, d_model, vocab, seed)
    e = embedding[tokens]  # (batch, length, d_model)
    h, states = torch.zeros(batch, d_model, dtype=torch.float64), []
    for t in range(length):
        h = 0.8 * h + e[:, t]
        states.append(h)
    h1 = torch.stack(states, dim=1)
    noise = torch.randn(h1.shape, generator=torch.Generator().manual_seed(seed), dtype=h1.dtype)
    layers = {0: e, 1: h1, 2: h1 + 0.3 * noise}
    return _capture({k: v.to(dtype) for k, v in layers.items()}, tokens), embedding


def _with_holes(cap, layer, kept):
    """``cap`` with ``layer`` NaN wherever ``kept`` `(batch, length)` is False."""
    states = dict(cap.states)
    states[layer] = states[layer].clone()
    states[layer][~kept] = torch.nan
    return Capture(cap.positions, states, cap.tokens, cap.length)


def _filtered_readout(states, targets, present, folds, generator, centered):
    """Per-anchor read-out scores computed from the present samples alone, written out:
    one read-out over the pooled present samples (each in its anchor's fold), then each
    anchor's mean over the sequences that have it. Returns (score, chance, prediction by
    sample) with NaN for anchors without a sample."""
    batch, n = present.shape
    if batch == 1:  # the plain filter: drop the anchors whose pair is missing
        keep = present[0]
        scores = readout_scores(
            states[:, keep], targets[:, keep], folds[keep], None, generator, centered
        )
        out = []
        for values in (scores.score[0], scores.chance[0]):
            full = torch.full((n,), torch.nan, dtype=torch.float64)
            full[keep] = values
            out.append(full)
        return *out, scores.prediction[0]
    sample_rows, sample_anchors = present.nonzero(as_tuple=True)  # row-major samples
    scores = readout_scores(
        states[sample_rows, sample_anchors][None],
        targets[sample_rows, sample_anchors][None],
        folds[sample_anchors],
        None,
        generator,
        centered,
    )
    out = []
    for values in (scores.score[0], scores.chance[0]):
        per_anchor = torch.full((n,), torch.nan, dtype=torch.float64)
        for anchor in sample_anchors.unique():
            per_anchor[anchor] = values[sample_anchors == anchor].mean()
        out.append(per_anchor)
    return *out, scores.prediction[0]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centered", [False, True])
def test_etmf_with_holes_equals_etmf_of_the_explicitly_filtered_samples(batch, dtype, centered):
    """Float64 arithmetic on the same samples: the only differences are summation order in
    per-anchor means (bound 1e-14)."""
    length, seed = 300, 5
    full, embedding = _recurrence_with_embedding(batch, length, 6, 30, seed=batch, dtype=dtype)
    kept = torch.rand(batch, length, generator=torch.Generator().manual_seed(batch)) > 0.3
    cap = _with_holes(full, 1, kept)
    anchors = sample_anchors(length, 120, torch.Generator().manual_seed(0))
    distances = torch.tensor([0, 1, 5, 40])
    result = etmf_per_anchor(
        cap, anchors, distances, [0, 1], embedding, seed=seed, centered=centered
    )
    frame = etmf_frame(result, n_boot=20, seed=seed)
    folds = assign_folds(len(anchors), 2, seeded_generator(seed))
    h = cap.states[1].double()
    e = cap.states[0].double()
    for j, d in enumerate(distances.tolist()):
        valid = int((anchors + d < length).sum())
        shifted = anchors[:valid] + d
        present = kept[:, shifted]  # (batch, valid): is h[1][t + d] in the layer
        score, chance, prediction = _filtered_readout(
            h[:, shifted],
            e[:, anchors[:valid]],
            present,
            folds[:valid],
            seeded_generator(seed, 1, d),
            centered,
        )
        got = result.score[1, j, :valid]
        assert torch.equal(torch.isnan(got), ~present.any(0))
        torch.testing.assert_close(got, score, rtol=0, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(
            result.chance[1, j, :valid], chance, rtol=0, atol=1e-14, equal_nan=True
        )
        hits = nearest_token_accuracy(
            prediction, cap.tokens[:, anchors[:valid]][present], embedding
        )
        accuracy = torch.full((batch, valid), torch.nan, dtype=torch.float64)
        accuracy[present] = hits.double()
        torch.testing.assert_close(
            result.accuracy[1, j, :valid], accuracy.nanmean(0), rtol=0, atol=1e-14, equal_nan=True
        )
        both = present & kept[:, anchors[:valid]]  # raw needs h[1][t] too
        cosines = torch.full((batch, valid), torch.nan, dtype=torch.float64)
        cosines[both] = torch.nn.functional.cosine_similarity(
            h[:, anchors[:valid]][both], h[:, shifted][both], dim=-1
        )
        torch.testing.assert_close(
            result.raw[1, j, :valid], cosines.nanmean(0), rtol=0, atol=1e-14, equal_nan=True
        )
        rows = frame[(frame.layer == 1) & (frame.distance == d)].set_index("metric")
        assert rows.loc["etmf", "n"] == int(present.sum())
        assert rows.loc["etmf_raw", "n"] == int(both.sum())
        assert rows.loc["etmf", "value"] == pytest.approx(float(score.nanmean()), abs=1e-14)
        assert (
            rows.loc["etmf", "ci_low"] <= rows.loc["etmf", "value"] <= rows.loc["etmf", "ci_high"]
        )
    # layer 0 has no holes: identical to the capture without any
    whole = etmf_frame(
        etmf_per_anchor(full, anchors, distances, [0], embedding, seed=seed, centered=centered),
        n_boot=20,
        seed=seed,
    )
    pd.testing.assert_frame_equal(
        frame[frame.layer == 0].reset_index(drop=True), whole, check_exact=True
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_hole_free_cells_are_the_batched_readout_bit_for_bit(batch):
    """Pooling present samples must not change a single bit when every sample is present."""
    cap, embedding = _recurrence_with_embedding(batch, 200, 5, 20, seed=1)
    anchors, distances, seed = torch.arange(0, 200, 3), torch.tensor([0, 2, 30]), 4
    result = etmf_per_anchor(cap, anchors, distances, [2], embedding, seed=seed, centered=True)
    folds = assign_folds(len(anchors), 2, seeded_generator(seed))
    for j, d in enumerate(distances.tolist()):
        valid = int((anchors + d < 200).sum())
        states = cap.states[2][:, anchors[:valid] + d]
        scores = readout_scores(
            states,
            cap.states[0][:, anchors[:valid]],
            folds[:valid],
            None,
            seeded_generator(seed, 2, d),
            True,
        )
        assert torch.equal(result.score[0, j, :valid], scores.score.mean(dim=0))
        assert torch.equal(result.chance[0, j, :valid], scores.chance.mean(dim=0))
        raw = rowwise_cosine(cap.states[2][:, anchors[:valid]], states).mean(dim=0)
        assert torch.equal(result.raw[0, j, :valid], raw)
        assert int(result.n_samples[0, j]) == int(result.n_raw_samples[0, j]) == batch * valid


def test_cells_without_enough_present_anchors_are_skipped_with_a_warning():
    cap, _ = _identity_capture(batch=1, length=100, d_model=4, vocab=10, seed=7)
    anchors, distances = torch.arange(100), torch.tensor([0, 5])
    early = _with_holes(cap, 1, torch.arange(100)[None] < 10)  # layer 1 holds 0..9 only
    with pytest.warns(UserWarning, match=r"skipped \(layer, distance\) cells \[\(1, 5\)\]"):
        result = etmf_per_anchor(early, anchors, distances)
    assert result.n_samples.tolist() == [[100, 95], [10, 0]]
    assert torch.isnan(result.score[1, 1]).all() and torch.isnan(result.raw[1, 1]).all()
    frame = etmf_frame(result, n_boot=0)
    assert set(zip(frame.layer, frame.distance, strict=True)) == {(0, 0), (0, 5), (1, 0)}
    # 50 anchors present, but all in one fold: no read-out can be cross-fitted
    one_fold = assign_folds(100, 2, seeded_generator(0)) == 0
    with pytest.warns(UserWarning, match=r"cells \[\(1, 0\)\]"):
        result = etmf_per_anchor(_with_holes(cap, 1, one_fold[None]), anchors, distances[:1])
    assert result.n_samples[1].tolist() == [0]


def test_summary_of_layers_scored_at_few_distances():
    cap, _ = _recurrence_with_embedding(1, 200, 4, 20, seed=3)
    cap = _with_holes(cap, 1, torch.arange(200)[None] < 30)  # layer 1: distances 0 and 1 only
    cap = _with_holes(cap, 2, torch.zeros(1, 200, dtype=torch.bool))  # layer 2: nothing
    distances = torch.tensor([0, 1, 50, 100])
    with pytest.warns(UserWarning, match="skipped"):
        result = etmf_per_anchor(cap, torch.arange(200), distances, centered=True)
    with pytest.warns(UserWarning, match=r"layers \[1\] have values at fewer than 3 .* \[2\]"):
        summary = etmf_summary(result, n_boot=20)
    assert list(summary.layer) == [0, 1]
    row = summary.set_index("layer").loc[1]
    assert not row.converged and math.isnan(row.half_life) and math.isnan(row.tau)
    assert math.isnan(row.half_life_r2) and not row.decaying
    normalized = etmf_frame(result, n_boot=0).query("metric == 'etmf_norm' and layer == 1")
    expected = contiguous_length(normalized.distance, normalized.value)
    assert row.contiguous_length == expected
    assert row.peak_distance == 1 and math.isnan(row.memory_mass)  # one distance >= 1
    assert math.isfinite(summary.set_index("layer").loc[0].tau)  # layer 0 was fitted


# --- anchor and distance sampling -------------------------------------------------------


def test_sample_anchors_sorted_unique_in_range():
    anchors = sample_anchors(10_000, 512, torch.Generator().manual_seed(0))
    assert anchors.shape == (512,) and anchors.dtype == torch.long
    assert (anchors[1:] > anchors[:-1]).all() and anchors.min() >= 0 and anchors.max() < 10_000
    assert torch.equal(sample_anchors(100, 512), torch.arange(100))
    with pytest.raises(ValueError, match="positive"):
        sample_anchors(0)
    with pytest.raises(TypeError, match="int"):
        sample_anchors(100.0)


@pytest.mark.parametrize(
    ("length", "n_anchors"), [(60_000, 512), (1_000, 512), (300, 512), (50, 8)]
)
def test_default_distances_log_spaced_and_supported_by_enough_anchors(length, n_anchors):
    distances = default_distances(length, n_anchors)
    assert distances[0] == 0 and (distances[1:] > distances[:-1]).all()
    n = min(n_anchors, length)
    largest = int(distances[-1])
    assert n * (length - largest) / length >= default_min_valid(n)  # expected valid anchors
    ratios = distances[2:].double() / distances[1:-1].double()
    assert ratios.max() <= 2.0  # no octave skipped
    octaves = math.log2(max(largest, 1))
    assert len(distances) - 1 <= 3 * octaves + 3  # about three per octave
    if length >= 1000:
        assert largest >= 0.8 * length * (1 - default_min_valid(n) / n)


def test_required_and_estimated_positions():
    anchors = torch.tensor([0, 10, 95])
    distances = torch.tensor([0, 1, 8])
    kept = required_positions(anchors, distances, 100)
    assert kept.tolist() == [0, 1, 8, 10, 11, 18, 95, 96]
    assert estimate_positions(100, 3, 3) >= len(kept)
    anchors = sample_anchors(60_000, 512, torch.Generator().manual_seed(1))
    distances = default_distances(60_000, 512)
    kept = required_positions(anchors, distances, 60_000)
    assert len(kept) <= estimate_positions(60_000, 512, len(distances))
    with pytest.raises(ValueError, match="non-negative"):
        required_positions(anchors, torch.tensor([-2]), 60_000)


def test_assign_folds_balances_every_prefix():
    folds = assign_folds(101, 2, torch.Generator().manual_seed(0))
    prefix_ones = torch.cumsum(folds, 0)
    sizes = torch.arange(1, 102)
    assert ((2 * prefix_ones - sizes).abs() <= 1).all()
    three = assign_folds(30, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(three).tolist() == [10, 10, 10]
    assert not torch.equal(folds, assign_folds(101, 2, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(10, 1)
