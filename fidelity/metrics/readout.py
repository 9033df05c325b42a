"""Cross-fitted ridge read-outs, closed form in torch (float64 inside).

A read-out ``R`` maps states ``X`` `(n, d_in)` to targets ``Y`` `(n, d_out)` with an intercept:
``R(x) = y_mean + (x - x_mean) @ W`` where ``x_mean``, ``y_mean`` are the means of the fitting
rows and ``W = (Xc^T Xc + alpha I)^-1 Xc^T Yc`` on the centred fitting rows. ``W`` comes from
one eigendecomposition of the smaller Gram matrix (``Xc Xc^T`` when ``n <= d_in``, else
``Xc^T Xc``), so any ``alpha`` and any number of targets cost only matrix products afterwards.

Unless given, ``alpha`` is chosen by generalized cross-validation (GCV) on a log grid scaled by
the mean non-zero eigenvalue ``m`` of ``Xc^T Xc``: ``alpha in m * 10**[-6 .. 4]`` (41 values),
minimizing ``GCV(alpha) = (RSS(alpha) / n) / (1 - (df(alpha) + 1) / n) ** 2`` with
``df(alpha) = sum_i s_i^2 / (s_i^2 + alpha)`` (the ``+ 1`` counts the intercept) and RSS
summed over all target columns (one shared ``alpha`` per target matrix). The part of RSS that
no ``alpha`` fits (targets outside the states' span) counts as 0 when it is below the
rounding of its sums, so that rounding never picks ``alpha``.

Cross-fitting (:func:`cross_fitted_predict`) predicts every row with a read-out fitted only on
rows of the other folds, so a read-out that could memorize its fitting rows never scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fidelity.metrics.sampling import assign_folds

GCV_RELATIVE_GRID = torch.logspace(-6, 4, 41, dtype=torch.float64)
"""GCV candidates, relative to the mean non-zero eigenvalue of the centred Gram matrix."""


def as_float64_matrix(name: str, value: object) -> torch.Tensor:
    """Validate a real `(n, d)` matrix (tensor or array) and return it as float64.

    Raises ``TypeError`` for non-array input and ``ValueError`` for a wrong number of
    dimensions, complex or boolean data, or NaN/inf entries.
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {value.dtype}")
    value = value.detach().to(device="cpu", dtype=torch.float64)
    # NaN and inf propagate into the sum: a finite sum (one pass) clears every entry
    if not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf; read-outs need finite values")
    return value


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` `(..., d)` -> `(...)` float64.

    Rows with zero norm get cosine 0 (no direction to agree with); values are clamped to
    ``[-1, 1]``.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"rowwise_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    dots = (a * b).sum(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, dots / safe, torch.zeros_like(dots)).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class RidgeReadout:
    """A fitted ridge read-out ``R(x) = y_mean + (x - x_mean) @ weight``.

    ``weight`` `(d_in, d_out)`, ``x_mean`` `(d_in,)`, ``y_mean`` `(d_out,)`, all float64;
    ``alpha`` is the ridge penalty used (chosen by GCV unless it was given).
    """

    weight: torch.Tensor
    x_mean: torch.Tensor
    y_mean: torch.Tensor
    alpha: float

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Predict targets for states ``X`` `(m, d_in)` -> `(m, d_out)` float64."""
        X = as_float64_matrix("X", X)
        if X.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"X has {X.shape[1]} columns but the read-out was fitted on {self.weight.shape[0]}"
            )
        return (X - self.x_mean) @ self.weight + self.y_mean


class _CentredSpectrum:
    """Eigendecompositions of ``k`` stacked centred fitting states: ridge for any target and
    alpha.

    For each of the ``k`` state matrices ``X`` `(n, d_in)` with ``Xc = U diag(s) V^T``, keeps
    ``V diag(s)`` `(k, d_in, r)` and ``s^2`` `(k, r)` with ``r = min(n, d_in)``, plus ``U``
    `(k, n, r)` when ``n <= d_in`` (else ``Xc`` and ``V``: ``U^T Yc = diag(1/s) V^T Xc^T Yc``
    needs no `(n, r)` matrix); directions whose eigenvalue is numerically zero are masked
    (``kept`` `(k, r)`, their columns and ``s^2`` set to 0), so every slice has the same shape.
    Ridge then reads ``W = V diag(s / (s^2 + alpha)) U^T Yc`` over the kept directions.
    """

    def __init__(self, X: torch.Tensor) -> None:
        _, n, d = X.shape
        self.n = n
        self.x_mean = X.mean(dim=1, keepdim=True)  # (k, 1, d)
        Xc = X - self.x_mean  # (k, n, d)
        if n <= d:
            eigenvalues, U = torch.linalg.eigh(Xc @ Xc.mT)  # (k, n), (k, n, n)
        else:
            eigenvalues, V = torch.linalg.eigh(Xc.mT @ Xc)  # (k, d), (k, d, d)
        top = eigenvalues.amax(dim=1, keepdim=True).clamp(min=0.0)  # (k, 1)
        self.kept = eigenvalues > top * max(n, d) * torch.finfo(torch.float64).eps  # (k, r)
        all_kept = bool(self.kept.all())
        self.s2 = eigenvalues if all_kept else torch.where(self.kept, eigenvalues, 0.0)  # (k, r)
        self.U: torch.Tensor | None = None
        if n <= d:
            self.U = U if all_kept else U * self.kept[:, None, :]  # (k, n, r)
            self.VS = Xc.mT @ self.U  # (k, d, r) = V diag(s)
        else:
            V = V if all_kept else V * self.kept[:, None, :]
            self.s = torch.where(self.kept, eigenvalues, 1.0).sqrt()[:, None, :]  # (k, 1, r)
            self.Xc, self.V = Xc, V  # U = Xc V / s is never formed
            self.VS = V * self.s  # (k, d, r)

    def project(self, Yc: torch.Tensor) -> torch.Tensor:
        """``Z = U^T Yc`` `(k, r, d_out)` of centred targets ``Yc`` `(k, n, d_out)` (0 for
        masked directions)."""
        if self.U is not None:
            return self.U.mT @ Yc
        return (self.V.mT @ (self.Xc.mT @ Yc)) / self.s.mT  # (d, d_out) products: no (n, r)

    def gcv_alpha(self, Yc: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        """GCV-optimal alpha `(k,)` on the relative grid for centred targets ``Yc``
        `(k, n, d_out)`, ``Z = U^T Yc`` `(k, r, d_out)`."""
        n_kept = self.kept.sum(dim=1)  # (k,)
        mean_s2 = torch.where(n_kept > 0, self.s2.sum(dim=1) / n_kept.clamp(min=1), 1.0)
        grid = mean_s2[:, None] * GCV_RELATIVE_GRID  # (k, n_grid)
        z2 = (Z**2).sum(dim=2)  # (k, r), 0 for masked directions
        total = (Yc**2).sum(dim=(-2, -1))  # (k,) or () for shared targets
        outside = total - z2.sum(dim=1)  # residual that no alpha fits
        # rounding of the two sums is no residual: with n <= d_in the kept directions span
        # every centred target, and noise in `outside` would decide GCV at small alpha
        rounding = Yc.shape[-2] * Yc.shape[-1] * torch.finfo(torch.float64).eps * total
        outside = torch.where(outside > rounding, outside, 0.0)
        shrink = grid[:, :, None] / (self.s2[:, None, :] + grid[:, :, None])  # (k, n_grid, r)
        rss = outside[:, None] + (shrink**2 * z2[:, None, :]).sum(dim=2)  # (k, n_grid)
        # 1 - (df + 1) / n with df = sum over kept (1 - shrink), without its cancellation
        kept_shrink = (shrink * self.kept[:, None, :]).sum(dim=2)  # (k, n_grid)
        slack = (self.n - 1 - n_kept[:, None] + kept_shrink) / self.n
        gcv = torch.where(slack > 0, rss / self.n / slack.clamp(min=1e-300) ** 2, torch.inf)
        return grid.gather(1, gcv.argmin(dim=1, keepdim=True))[:, 0]

    def coefficients(
        self, Y: torch.Tensor, alpha: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y_mean (k, 1, d_out), Z / (s^2 + alpha) (k, r, d_out), alpha (k,))`` for targets
        ``Y`` `(k, n, d_out)` (or `(n, d_out)`, shared by all ``k``); constant states (nothing
        kept) fit the intercept alone."""
        y_mean = Y.mean(dim=-2, keepdim=True)
        Yc = Y - y_mean  # (k, n, d_out)
        Z = self.project(Yc)  # (k, r, d_out)
        if alpha is None:
            alphas = self.gcv_alpha(Yc, Z)
            alphas = torch.where(self.kept.any(dim=1), alphas, 0.0)
        else:
            alphas = torch.full((self.kept.shape[0],), alpha, dtype=torch.float64)
        inverse = torch.where(self.kept, 1.0 / (self.s2 + alphas[:, None]), 0.0)  # (k, r)
        return y_mean, Z * inverse[:, :, None], alphas

    def solve(self, Y: torch.Tensor, alpha: float | None) -> list[RidgeReadout]:
        """Fit targets ``Y`` `(k, n, d_out)` (rows matching the states) with ``alpha`` or GCV."""
        y_mean, scaled, alphas = self.coefficients(Y, alpha)
        weight = self.VS @ scaled  # (k, d_in, d_out)
        return [
            RidgeReadout(weight[i], self.x_mean[i, 0], y_mean[i, 0], float(alphas[i]))
            for i in range(Y.shape[0])
        ]

    def predict(
        self, X_new: torch.Tensor, targets: Sequence[torch.Tensor], alpha: float | None
    ) -> list[torch.Tensor]:
        """Predictions `(k, m, d_out_j)` for new states ``X_new`` `(k, m, d_in)`, one per
        target `(k, n, d_out_j)`.

        Same as ``solve(Y, alpha)[i].predict(X_new[i])`` but never forms the weights: the
        states are projected once, ``(X_new - x_mean) V diag(s)`` `(k, m, r)`, and reused.
        """
        projected = (X_new - self.x_mean) @ self.VS  # (k, m, r)
        predictions = []
        for Y in targets:
            y_mean, scaled, _ = self.coefficients(Y, alpha)
            predictions.append(projected @ scaled + y_mean)
        return predictions


def _check_alpha(alpha: float | None) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or None (GCV), got {type(alpha).__name__}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite non-negative number or None (GCV), got {alpha}")
    return float(alpha)


def _check_pair(X: object, Y: object) -> tuple[torch.Tensor, torch.Tensor]:
    X = as_float64_matrix("X", X)
    Y = as_float64_matrix("Y", Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y need the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
    return X, Y


def fit_ridge(X: torch.Tensor, Y: torch.Tensor, alpha: float | None = None) -> RidgeReadout:
    """Fit a ridge read-out from states ``X`` `(n, d_in)` to targets ``Y`` `(n, d_out)`.

    ``alpha=None`` chooses the penalty by GCV (see the module docstring); ``alpha=0`` gives
    the minimum-norm least-squares fit. Needs ``n >= 2`` (the intercept uses one degree of
    freedom).
    """
    X, Y = _check_pair(X, Y)
    alpha = _check_alpha(alpha)
    if X.shape[0] < 2:
        raise ValueError(
            f"fit_ridge needs at least 2 rows (one goes to the intercept), got {X.shape[0]}"
        )
    return _CentredSpectrum(X[None]).solve(Y[None], alpha)[0]


def _fold_masks(folds: object, n: int) -> list[torch.Tensor]:
    """Validate integer fold labels `(n,)`; return one held-out mask `(n,)` bool per fold."""
    folds = torch.as_tensor(folds)
    if folds.shape != (n,) or folds.dtype.is_floating_point or folds.dtype == torch.bool:
        raise ValueError(
            f"folds must be a 1-D integer tensor of length {n}, "
            f"got {folds.dtype} of shape {tuple(folds.shape)}"
        )
    labels, counts = torch.unique(folds, return_counts=True)
    if labels.numel() < 2:
        raise ValueError("folds must contain at least 2 distinct labels for cross-fitting")
    if int(n - counts.max()) < 2:
        raise ValueError("every fold's complement must hold at least 2 rows to fit a read-out on")
    return [folds == label for label in labels]


def _cross_fit(
    X: torch.Tensor, targets: list[torch.Tensor], masks: list[torch.Tensor], alpha: float | None
) -> list[torch.Tensor]:
    """Cross-fitted predictions `(k, n, d_out_j)` of ``k`` stacked read-outs: validated float64
    states ``X`` `(k, n, d_in)`, targets `(k, n, d_out_j)` or `(n, d_out_j)` (shared by the
    ``k``), held-out ``masks`` `(n,)`.

    Samples are reordered once so that every fold is a contiguous block: fitting rows and
    held-out rows are then slices, not masked copies.
    """
    order = torch.cat([held_out.nonzero().squeeze(1) for held_out in masks])  # fold by fold
    sizes = [int(held_out.sum()) for held_out in masks]
    X = X.index_select(1, order)
    targets = [Y.index_select(-2, order) for Y in targets]
    k, n = X.shape[:2]
    grouped = [torch.empty(k, n, Y.shape[-1], dtype=torch.float64) for Y in targets]
    start = 0
    for size in sizes:
        held, end = slice(start, start + size), start + size

        def others(values: torch.Tensor, end: int = end, start: int = start) -> torch.Tensor:
            """The rows of ``values`` `(..., n, d)` outside the held-out block."""
            if start == 0 or end == n:  # one contiguous block: a view
                return values[..., end:, :] if start == 0 else values[..., :start, :]
            return torch.cat([values[..., :start, :], values[..., end:, :]], dim=-2)

        fitted = _CentredSpectrum(others(X)).predict(
            X[:, held], [others(Y) for Y in targets], alpha
        )
        for prediction, rows in zip(grouped, fitted, strict=True):
            prediction[:, held] = rows
        start = end
    return [torch.empty_like(g).index_copy_(1, order, g) for g in grouped]


def cross_fitted_predict_many(
    X: torch.Tensor,
    targets: Sequence[torch.Tensor],
    folds: torch.Tensor,
    alpha: float | None = None,
) -> list[torch.Tensor]:
    """Cross-fitted predictions of several targets from the same states.

    ``X`` `(n, d_in)`; each target `(n, d_out_k)`; ``folds`` `(n,)` integer labels. Row ``i`` of
    each result `(n, d_out_k)` comes from a read-out fitted on the rows whose label differs from
    ``folds[i]``. Each target gets its own GCV penalty; the decomposition of each fold's states
    is shared, which is what makes several targets cheap.
    """
    X = as_float64_matrix("X", X)
    targets = [as_float64_matrix(f"targets[{k}]", Y) for k, Y in enumerate(targets)]
    for k, Y in enumerate(targets):
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"targets[{k}] has {Y.shape[0]} rows but X has {X.shape[0]}")
    masks = _fold_masks(folds, X.shape[0])
    predictions = _cross_fit(X[None], [Y[None] for Y in targets], masks, _check_alpha(alpha))
    return [prediction[0] for prediction in predictions]


def cross_fitted_predict(
    X: torch.Tensor,
    Y: torch.Tensor,
    folds: torch.Tensor | None = None,
    n_folds: int = 2,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Predict every row of ``Y`` `(n, d_out)` from ``X`` `(n, d_in)` without its own fold.

    ``folds`` `(n,)` gives integer fold labels; when None, rows are split at random into
    ``n_folds`` balanced folds drawn from ``generator``. Returns `(n, d_out)` float64.
    """
    X, Y = _check_pair(X, Y)
    if folds is None:
        folds = assign_folds(X.shape[0], n_folds, generator)
    return cross_fitted_predict_many(X, [Y], folds, alpha)[0]


@dataclass(frozen=True)
class ReadoutScores:
    """Per-sample read-out fidelity of one pairing of states and targets (or of ``k`` stacked
    ones, see :func:`stacked_readout_scores`).

    ``score`` `(batch, n)`: cosine between each target and its cross-fitted prediction;
    ``chance`` `(batch, n)`: the same procedure after pairing targets with states of unrelated
    samples; ``prediction`` `(batch, n, d_out)`: the cross-fitted predictions behind ``score``.
    """

    score: torch.Tensor
    chance: torch.Tensor
    prediction: torch.Tensor


def _within_fold_shuffle(
    masks: list[torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    """A random permutation `(n,)` of sample indices that maps each fold onto itself."""
    shuffle = torch.arange(masks[0].numel())
    for held_out in masks:
        members = torch.nonzero(held_out).squeeze(1)
        shuffle[members] = members[torch.randperm(members.numel(), generator=generator)]
    return shuffle


def _other_fold_means(targets: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """For each row of ``targets`` `(n, d)`, the mean of the rows in the other folds `(n, d)`.

    That is the intercept (``y_mean``) of the read-out which predicts the row.
    """
    means = torch.empty_like(targets)
    for held_out in masks:
        means[held_out] = targets[~held_out].mean(dim=0)
    return means


def readout_scores(
    states: torch.Tensor,
    targets: torch.Tensor,
    folds: torch.Tensor,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    centered: bool = False,
) -> ReadoutScores:
    """Score how well ``targets`` can be read out of ``states``, with a chance level.

    ``states`` `(batch, n, d_in)` and ``targets`` `(batch, n, d_out)` are paired samples
    (``n`` anchors in each of ``batch`` sequences); ``folds`` `(n,)` assigns anchors to folds,
    and all of an anchor's samples share its fold. The (batch, anchor) samples are pooled and
    each is predicted by a read-out fitted on the other folds:
    ``score = cos(target, R(state))``. For ``chance`` the targets are first permuted at random
    within each fold, so every state is paired with the target of an unrelated sample, and
    the identical procedure is run: ``chance = cos(target[pi], R'(state))``.

    ``centered=True`` measures both cosines about the read-out's intercept ``y_mean`` (the
    mean target of the fitting folds): ``cos(target - y_mean, R(state) - y_mean)``, so a mean
    direction shared by all targets neither inflates the score nor hides a weak signal.
    """
    if states.dim() != 3 or targets.dim() != 3 or states.shape[:2] != targets.shape[:2]:
        raise ValueError(
            "states and targets must be (batch, n, d) with matching batch and n, got "
            f"{tuple(states.shape)} and {tuple(targets.shape)}"
        )
    batch, n = states.shape[:2]
    # samples are (row, anchor) pairs in row-major order: sample = row * n + anchor
    masks = [held_out.repeat(batch) for held_out in _fold_masks(folds, n)]  # (batch * n,) each
    scores = _stacked_scores(
        as_float64_matrix("states", states.reshape(batch * n, -1))[None],
        as_float64_matrix("targets", targets.reshape(batch * n, -1)),
        masks,
        _check_alpha(alpha),
        [generator],
        centered,
    )
    return ReadoutScores(
        score=scores.score.reshape(batch, n),
        chance=scores.chance.reshape(batch, n),
        prediction=scores.prediction.reshape(batch, n, -1),
    )


def stacked_readout_scores(
    states: torch.Tensor,
    targets: torch.Tensor,
    folds: torch.Tensor,
    alpha: float | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    centered: bool = False,
) -> ReadoutScores:
    """:func:`readout_scores` of ``k`` state matrices against the same targets, at once.

    ``states`` `(k, m, d_in)` (e.g. ``k`` layers at the same samples), ``targets`` `(m, d_out)`,
    ``folds`` `(m,)` sample folds, ``generators`` one per state matrix (its chance
    permutation; None: ``k`` times the global generator). Slice ``i`` of the result (``score``
    and ``chance`` `(k, m)`, ``prediction`` `(k, m, d_out)`) is
    ``readout_scores(states[i][None], targets[None], folds, alpha, generators[i], centered)``:
    the ``k`` read-outs of a fold share one batched eigendecomposition and GCV.
    """
    if states.dim() != 3 or targets.dim() != 2 or states.shape[1] != targets.shape[0]:
        raise ValueError(
            "states must be (k, m, d_in) and targets (m, d_out) with matching m, got "
            f"{tuple(states.shape)} and {tuple(targets.shape)}"
        )
    k, m = states.shape[:2]
    generators = [None] * k if generators is None else list(generators)
    if len(generators) != k:
        raise ValueError(f"need one generator per state matrix ({k}), got {len(generators)}")
    return _stacked_scores(
        as_float64_matrix("states", states.reshape(k * m, -1)).reshape(k, m, -1),
        as_float64_matrix("targets", targets),
        _fold_masks(folds, m),
        _check_alpha(alpha),
        generators,
        centered,
    )


def _stacked_scores(
    states: torch.Tensor,
    targets: torch.Tensor,
    masks: list[torch.Tensor],
    alpha: float | None,
    generators: list[torch.Generator | None],
    centered: bool,
) -> ReadoutScores:
    """Scores `(k, m)` of validated float64 ``states`` `(k, m, d_in)` against ``targets``
    `(m, d_out)` with held-out ``masks`` `(m,)`; see :func:`readout_scores`."""
    k = states.shape[0]
    unrelated = torch.stack(
        [targets[_within_fold_shuffle(masks, generator)] for generator in generators]
    )  # (k, m, d_out)
    prediction, unrelated_prediction = _cross_fit(states, [targets, unrelated], masks, alpha)
    # shuffling within folds keeps each fold's set of targets, hence the same intercepts
    origin = _other_fold_means(targets, masks) if centered else 0.0
    return ReadoutScores(
        score=rowwise_cosine((targets - origin).expand(k, -1, -1), prediction - origin),
        chance=rowwise_cosine(unrelated - origin, unrelated_prediction - origin),
        prediction=prediction,
    )
