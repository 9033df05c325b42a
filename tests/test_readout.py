"""Ridge read-outs: closed-form agreement, GCV behaviour, cross-fitting, validation."""

import numpy as np
import pytest
import torch

from fidelity.metrics.readout import (
    cross_fitted_predict,
    cross_fitted_predict_many,
    fit_ridge,
    readout_scores,
    rowwise_cosine,
)
from fidelity.metrics.sampling import assign_folds


def _closed_form(X: np.ndarray, Y: np.ndarray, alpha: float, X_new: np.ndarray) -> np.ndarray:
    """Textbook ridge with an unpenalized intercept: solve (Xc^T Xc + alpha I) W = Xc^T Yc."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return (X_new - x_mean) @ W + y_mean


@pytest.mark.parametrize(("n", "d_in"), [(40, 7), (9, 25)])
@pytest.mark.parametrize("alpha", [0.37, 5.0])
def test_fit_ridge_matches_closed_form(n, d_in, alpha):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(n, d_in)), rng.normal(size=(n, 3))
    X_new = rng.normal(size=(6, d_in))
    readout = fit_ridge(torch.from_numpy(X), torch.from_numpy(Y), alpha=alpha)
    expected = _closed_form(X, Y, alpha, X_new)
    np.testing.assert_allclose(
        readout.predict(torch.from_numpy(X_new)).numpy(), expected, atol=1e-8
    )
    assert readout.alpha == alpha


def test_fit_ridge_alpha_zero_matches_lstsq_with_intercept():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(30, 5)) * 3 + 2, rng.normal(size=(30, 4))
    design = np.hstack([X, np.ones((30, 1))])
    coef, *_ = np.linalg.lstsq(design, Y, rcond=None)
    readout = fit_ridge(torch.from_numpy(X), torch.from_numpy(Y), alpha=0.0)
    np.testing.assert_allclose(readout.weight.numpy(), coef[:5], atol=1e-8)
    np.testing.assert_allclose(
        readout.predict(torch.from_numpy(X)).numpy(), design @ coef, atol=1e-8
    )


def test_fit_ridge_accepts_numpy_and_float16():
    X = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    from_numpy = fit_ridge(X.numpy(), (2 * X).numpy(), alpha=1e-3)
    from_half = fit_ridge(X.half(), (2 * X).half(), alpha=1e-3)
    assert from_numpy.weight.dtype == torch.float64
    assert torch.allclose(from_half.weight, from_numpy.weight, atol=1e-2)


def test_gcv_picks_larger_alpha_for_noisier_targets():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64)
    signal = X @ torch.randn(10, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(200, 3, generator=g, dtype=torch.float64)
    alphas = [fit_ridge(X, signal + scale * noise).alpha for scale in (0.01, 1.0, 30.0)]
    assert alphas[0] < alphas[1] < alphas[2]


def test_gcv_fit_recovers_noiseless_linear_map():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(100, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 2, generator=g, dtype=torch.float64)
    readout = fit_ridge(X, X @ W + 1.5)
    X_new = torch.randn(10, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(readout.predict(X_new), X_new @ W + 1.5, atol=1e-4)


def test_constant_states_fit_only_the_intercept():
    Y = torch.arange(12.0).reshape(6, 2)
    readout = fit_ridge(torch.ones(6, 3), Y)
    assert torch.allclose(readout.predict(torch.zeros(2, 3)), Y.mean(0).double().expand(2, 2))


@pytest.mark.parametrize(
    ("X", "Y", "kwargs", "error", "message"),
    [
        (torch.zeros(5, 3), torch.zeros(4, 2), {}, ValueError, "same number of rows"),
        (torch.zeros(5), torch.zeros(5, 2), {}, ValueError, "2-D"),
        (torch.full((5, 3), float("nan")), torch.zeros(5, 2), {}, ValueError, "NaN"),
        (torch.zeros(5, 3), torch.full((5, 2), float("inf")), {}, ValueError, "NaN or inf"),
        ([[1.0, 2.0]], torch.zeros(1, 2), {}, TypeError, "torch.Tensor or numpy"),
        (torch.zeros(5, 3), torch.zeros(5, 2), {"alpha": -1.0}, ValueError, "non-negative"),
        (torch.zeros(5, 3), torch.zeros(5, 2), {"alpha": "big"}, TypeError, "alpha"),
        (torch.zeros(1, 3), torch.zeros(1, 2), {}, ValueError, "at least 2 rows"),
        (torch.zeros(5, 3, dtype=torch.bool), torch.zeros(5, 2), {}, ValueError, "real numbers"),
    ],
)
def test_fit_ridge_rejects_bad_input(X, Y, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_ridge(X, Y, **kwargs)


def test_predict_rejects_wrong_width():
    readout = fit_ridge(torch.randn(10, 3), torch.randn(10, 2))
    with pytest.raises(ValueError, match="3"):
        readout.predict(torch.randn(4, 5))


def test_cross_fitted_rows_come_from_other_folds_by_construction():
    """One-hot states: a row's own feature is unseen by the other fold, so its prediction must
    be exactly the other fold's mean target; any leak of the row's own fold would show."""
    n = 12
    X = torch.eye(n, dtype=torch.float64)
    Y = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    folds = torch.tensor([0, 1] * (n // 2))
    predicted = cross_fitted_predict(X, Y, folds=folds, alpha=1e-10)
    for label in (0, 1):
        rows = folds == label
        assert torch.allclose(
            predicted[rows], Y[~rows].mean(0).expand(int(rows.sum()), 3), atol=1e-8
        )


def test_memorizing_readout_scores_chance_on_noise_when_cross_fitted():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 400, generator=g, dtype=torch.float64)  # n < d: can interpolate
    Y = torch.randn(200, 16, generator=g, dtype=torch.float64)  # pure noise
    in_sample = fit_ridge(X, Y, alpha=1e-10).predict(X)
    assert rowwise_cosine(Y, in_sample).mean() > 0.999
    crossed = cross_fitted_predict(X, Y, alpha=1e-10, generator=torch.Generator().manual_seed(0))
    assert abs(float(rowwise_cosine(Y, crossed).mean())) < 0.05


def test_cross_fitted_predict_matches_per_fold_fits():
    g = torch.Generator().manual_seed(6)
    X, Y = torch.randn(30, 4, generator=g), torch.randn(30, 2, generator=g)
    folds = torch.arange(30) % 3
    predicted = cross_fitted_predict(X, Y, folds=folds, alpha=0.5)
    for label in range(3):
        rows = folds == label
        expected = fit_ridge(X[~rows], Y[~rows], alpha=0.5).predict(X[rows])
        assert torch.allclose(predicted[rows], expected, atol=1e-12)


def test_cross_fitted_predict_many_fits_each_target_separately():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    targets = [
        X @ torch.randn(5, 2, generator=g, dtype=torch.float64),
        torch.randn(40, 3, generator=g),
    ]
    folds = assign_folds(40, 2, torch.Generator().manual_seed(0))
    together = cross_fitted_predict_many(X, targets, folds)
    for Y, prediction in zip(targets, together, strict=True):
        assert torch.allclose(prediction, cross_fitted_predict(X, Y, folds=folds), atol=1e-12)


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        (torch.zeros(10, dtype=torch.long), "2 distinct"),
        (torch.arange(9), "length 10"),
        (torch.tensor([0.0, 1.0] * 5), "integer"),
        (torch.tensor([0] * 9 + [1]), "complement"),
    ],
)
def test_cross_fitting_rejects_bad_folds(folds, message):
    with pytest.raises(ValueError, match=message):
        cross_fitted_predict(torch.randn(10, 3), torch.randn(10, 2), folds=folds)


def test_rowwise_cosine_handles_zero_rows_and_range():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    assert rowwise_cosine(a, b).tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="equal shapes"):
        rowwise_cosine(a, b[:2])


def test_readout_scores_identity_states_score_one_and_chance_zero():
    g = torch.Generator().manual_seed(8)
    targets = torch.randn(2, 300, 8, generator=g, dtype=torch.float64) + 0.3
    folds = assign_folds(300, 2, torch.Generator().manual_seed(1))
    scores = readout_scores(targets, targets, folds, alpha=1e-9, generator=g, centered=True)
    assert scores.score.shape == (2, 300) and scores.prediction.shape == (2, 300, 8)
    assert torch.allclose(scores.score, torch.ones(2, 300, dtype=torch.float64), atol=1e-9)
    assert abs(float(scores.chance.mean())) < 0.05


def test_uncentered_chance_reflects_shared_mean_direction():
    """Unrelated targets that share a mean direction agree with the read-out's intercept:
    uncentred chance is well above 0, centred chance is not."""
    g = torch.Generator().manual_seed(9)
    targets = torch.randn(1, 400, 8, generator=g, dtype=torch.float64) * 0.5 + 1.0
    states = torch.randn(1, 400, 8, generator=g, dtype=torch.float64)  # unrelated to targets
    folds = assign_folds(400, 2, torch.Generator().manual_seed(2))
    plain = readout_scores(states, targets, folds, generator=torch.Generator().manual_seed(0))
    centred = readout_scores(
        states, targets, folds, generator=torch.Generator().manual_seed(0), centered=True
    )
    assert float(plain.chance.mean()) > 0.8
    assert abs(float(plain.score.mean() - plain.chance.mean())) < 0.02
    assert abs(float(centred.chance.mean())) < 0.05
