"""Stacked read-outs (one batched eigendecomposition per fold for k state matrices) against the
per-matrix read-out they replaced, written out here as the reference."""

import pytest
import torch

from fidelity.metrics.readout import (
    GCV_RELATIVE_GRID,
    fit_ridge,
    readout_scores,
    rowwise_cosine,
    stacked_readout_scores,
)
from fidelity.metrics.sampling import assign_folds, seeded_generator


def _reference_fit_predict(X, Y, X_new, alpha):
    """The former per-matrix read-out: eigendecomposition of the smaller Gram matrix with the
    numerically zero directions dropped, GCV over the relative grid. Two numerical changes
    are carried over: the residual outside the states' span is 0 below rounding, and the GCV
    slack is summed without cancellation (see test_gcv_ignores_rounding_when_interpolating)."""
    n, d = X.shape
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    if n <= d:
        eigenvalues, U = torch.linalg.eigh(Xc @ Xc.T)
    else:
        eigenvalues, V = torch.linalg.eigh(Xc.T @ Xc)
    top = float(eigenvalues.max())
    keep = eigenvalues > max(top, 0.0) * max(n, d) * torch.finfo(torch.float64).eps
    s2 = eigenvalues[keep]
    if s2.numel() == 0:
        return y_mean.expand(X_new.shape[0], -1)
    if n <= d:
        U = U[:, keep]
        VS = Xc.T @ U
    else:
        V = V[:, keep]
        U, VS = (Xc @ V) / s2.sqrt(), V * s2.sqrt()
    Z = U.T @ Yc
    if alpha is None:
        grid = s2.mean() * GCV_RELATIVE_GRID
        z2 = (Z**2).sum(1)
        outside = (Yc**2).sum() - z2.sum()
        if outside <= Yc.numel() * torch.finfo(torch.float64).eps * (Yc**2).sum():
            outside = 0.0  # rounding (the former code took it for a residual; see below)
        shrink = grid[:, None] / (s2[None, :] + grid[:, None])
        rss = outside + (shrink**2) @ z2
        slack = (n - 1 - s2.numel() + shrink.sum(1)) / n  # 1 - (df + 1) / n, no cancellation
        gcv = torch.where(slack > 0, rss / n / slack.clamp(min=1e-300) ** 2, torch.inf)
        alpha = float(grid[int(gcv.argmin())])
    return (X_new - x_mean) @ VS @ (Z / (s2 + alpha)[:, None]) + y_mean


def _reference_scores(states, targets, folds, alpha, generator, centered):
    """Score and chance `(m,)` of one state matrix `(m, d_in)`, cell by cell."""
    masks = [folds == label for label in folds.unique()]
    shuffle = torch.arange(folds.numel())
    for held_out in masks:
        members = held_out.nonzero().squeeze(1)
        shuffle[members] = members[torch.randperm(members.numel(), generator=generator)]
    unrelated = targets[shuffle]
    out = []
    for Y in (targets, unrelated):
        prediction, origin = torch.empty_like(Y), torch.zeros_like(Y)
        for held_out in masks:
            fit = ~held_out
            prediction[held_out] = _reference_fit_predict(
                states[fit], Y[fit], states[held_out], alpha
            )
            if centered:
                origin[held_out] = targets[fit].mean(0)
        out.append(rowwise_cosine(Y - origin, prediction - origin))
    return out


@pytest.mark.parametrize(
    ("m", "d_in", "rank", "alpha", "centered"),
    [
        (120, 9, 9, None, True),  # fitting rows > d_in: the (d_in, d_in) Gram matrix
        (30, 40, 40, None, False),  # fitting rows <= d_in: the (n, n) Gram matrix
        (80, 12, 5, None, True),  # rank-deficient states: directions masked per slice
        (64, 6, 6, 0.3, False),  # a fixed penalty
    ],
)
def test_stacked_scores_match_the_per_matrix_readout(m, d_in, rank, alpha, centered):
    g = torch.Generator().manual_seed(m + d_in)
    k, d_out = 5, 7
    targets = torch.randn(m, d_out, generator=g, dtype=torch.float64) + 0.5
    mixing = torch.randn(k, d_out, rank, generator=g, dtype=torch.float64)
    lift = torch.randn(k, rank, d_in, generator=g, dtype=torch.float64)
    noise = torch.rand(k, 1, 1, generator=g, dtype=torch.float64) * 3
    states = (targets @ mixing + noise * torch.randn(k, m, rank, generator=g)) @ lift
    states[2] = 1.0  # constant states: the intercept alone
    folds = assign_folds(m, 2, seeded_generator(1))
    generators = [seeded_generator(3, i) for i in range(k)]
    stacked = stacked_readout_scores(states, targets, folds, alpha, generators, centered)
    for i in range(k):
        score, chance = _reference_scores(
            states[i], targets, folds, alpha, seeded_generator(3, i), centered
        )
        torch.testing.assert_close(stacked.score[i], score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(stacked.chance[i], chance, rtol=1e-9, atol=1e-9)
        single = readout_scores(
            states[i][None], targets[None], folds, alpha, seeded_generator(3, i), centered
        )
        torch.testing.assert_close(
            stacked.prediction[i], single.prediction[0], rtol=1e-9, atol=1e-9
        )
    for label in (0, 1):  # constant states predict the other fold's mean target
        held_out = folds == label
        expected = targets[~held_out].mean(0).expand(int(held_out.sum()), -1)
        torch.testing.assert_close(stacked.prediction[2, held_out], expected)


def test_stacked_scores_reject_mismatched_shapes_and_generators():
    states, targets = torch.randn(2, 10, 3), torch.randn(10, 4)
    folds = torch.arange(10) % 2
    with pytest.raises(ValueError, match="matching m"):
        stacked_readout_scores(states, targets[:9], folds)
    with pytest.raises(ValueError, match="one generator per state matrix"):
        stacked_readout_scores(states, targets, folds, generators=[None])


def test_gcv_ignores_rounding_when_interpolating():
    """With fewer rows than state dimensions every centred target is in the states' span: the
    residual no alpha fits is 0, and its rounding (which depends on the order of the rows)
    must not choose alpha (the former code chose another grid point on 9 of these 12)."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(16, 40, generator=g, dtype=torch.float64) * 3 + 1
        Y = torch.randn(16, 7, generator=g, dtype=torch.float64)
        order = torch.randperm(16, generator=g)
        shuffled = fit_ridge(X[order], Y[order]).alpha
        assert fit_ridge(X, Y).alpha == pytest.approx(shuffled, rel=1e-12)
