"""Vertical memory fidelity: how much of layer ``l`` survives into layer ``l + m``.

Notation: ``h[l][t]`` is the residual stream at layer ``l`` (the output of block ``l - 1``;
layer 0: token embeddings) at position ``t``. For each (source ``l``, target ``l + m``) pair,
over the anchors ``t``:

- ``eclmf``: ``ECLMF(l -> l + m) = mean_t cos(h[l][t], R(h[l + m][t]))`` where ``R`` is a ridge
  read-out from the target layer back to the source layer, cross-fitted over two anchor folds.
- ``eclmf_chance``: the identical procedure with ``h[l][t]`` paired with ``h[l + m][t']`` of an
  unrelated anchor ``t'`` (a random permutation within folds).
- ``eclmf_norm``: ``(ECLMF - chance) / (1 - chance)``.
- ``cka``: linear CKA between the two layers' states at the anchors (no read-out).
- ``eclmf_raw``: ``mean_t cos(h[l][t], h[l + m][t])`` (only when both widths agree).

Rows use the tidy columns of :data:`fidelity.schema.TIDY_COLUMNS` with ``layer`` = target,
``source_layer`` = source and ``distance`` = target - source (in layers).

Missing samples (NaN states: positions absent from a layer, as a DeciMamba capture stores
positions dropped by decimation): a pair of layers uses the (sequence, anchor) samples present
in both, for every metric above; an anchor's value is the mean over the sequences that have it,
anchors with none are left out, ``n`` counts the samples used, and a pair with fewer than
:data:`~fidelity.metrics.toolkit.MIN_ANCHORS_PER_CELL` such anchors (or half that in a fold) is
skipped with a warning. Without missing samples this is exactly the computation above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import combinations, pairwise
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

from fidelity.metrics.curves import (
    DEFAULT_LEVEL,
    bootstrap_counts,
    mean_with_interval,
    normalized_with_interval,
)
from fidelity.metrics.readout import as_float64_matrix, rowwise_cosine
from fidelity.metrics.sampling import assign_folds, seeded_generator
from fidelity.metrics.toolkit import (
    MIN_ANCHORS_PER_CELL,
    captured_states,
    enough_anchors,
    per_anchor_mean,
    pooled_readout_scores,
    present_samples,
    tidy_frame,
    validate_anchors,
)
from fidelity.probes.capture_types import Capture

PAIR_SETS = ("adjacent", "from_embedding", "all")
"""Named pair sets; ``None`` means ``from_embedding`` together with ``adjacent``."""

CKA_INTERVAL_MAX_SAMPLES = 2048
"""Pooled samples above which the CKA interval (built on `(n, n)` Gram matrices) is skipped."""


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between representations ``X`` `(n, d1)` and ``Y`` `(n, d2)` of the same items.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred float64 data
    (computed through `(n, n)` Gram matrices when that is cheaper). In ``[0, 1]``: 1 when ``Y``
    is an orthogonal transform and rescaling of ``X``. NaN when either has no variance.
    """
    X = as_float64_matrix("X", X)
    Y = as_float64_matrix("Y", Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y need the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 rows, got {X.shape[0]}")
    Xc = X - X.mean(dim=0)
    Yc = Y - Y.mean(dim=0)
    if X.shape[0] > max(X.shape[1], Y.shape[1]):
        cross = (Yc.T @ Xc).square().sum()
        norm = (Xc.T @ Xc).norm() * (Yc.T @ Yc).norm()
    else:
        K, L = Xc @ Xc.T, Yc @ Yc.T  # (n, n) each
        cross = (K * L).sum()
        norm = K.norm() * L.norm()
    if norm <= 0:
        return math.nan
    return float((cross / norm).clamp(0.0, 1.0))


def _weighted_hsic(K: torch.Tensor, L: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """HSIC of Gram matrices ``K``, ``L`` `(n, n)` under sample weights ``P`` `(n_rep, n)`.

    Each row of ``P`` sums to 1; with weighted centring the statistic is
    ``p^T (K o L) p - 2 p^T (Kp o Lp) + (p^T K p)(p^T L p)``. Returns `(n_rep,)`.
    """
    KP, LP = P @ K, P @ L  # (n_rep, n), K and L symmetric
    return (
        (P @ (K * L) * P).sum(dim=1)
        - 2 * (P * KP * LP).sum(dim=1)
        + (P * KP).sum(dim=1) * (P * LP).sum(dim=1)
    )


def cka_replicates(X: torch.Tensor, Y: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """Linear CKA of ``X`` `(n, d1)` and ``Y`` `(n, d2)` under sample ``weights`` `(n, n_rep)`.

    ``weights[i, r]`` is how often sample ``i`` counts in replicate ``r`` (bootstrap counts,
    or 0/1 for leave-out replicates); the result `(n_rep,)` equals :func:`linear_cka` on the
    correspondingly repeated rows, without building them.
    """
    X = as_float64_matrix("X", X)
    Y = as_float64_matrix("Y", Y)
    Xc, Yc = X - X.mean(dim=0), Y - Y.mean(dim=0)
    K, L = Xc @ Xc.T, Yc @ Yc.T  # (n, n)
    P = torch.from_numpy(weights.T / weights.sum(axis=0)[:, None])  # (n_rep, n)
    hsic = _weighted_hsic(K, L, P)
    scale = (_weighted_hsic(K, K, P) * _weighted_hsic(L, L, P)).clamp(min=0).sqrt()
    cka = torch.where(scale > 0, hsic / scale.clamp(min=1e-300), torch.nan).clamp(0.0, 1.0)
    return cka.numpy()


def leave_one_out_cka(X: torch.Tensor, Y: torch.Tensor, group: torch.Tensor) -> np.ndarray:
    """Linear CKA of ``X`` `(m, d1)` and ``Y`` `(m, d2)` leaving out one group of rows at a time.

    ``group`` `(m,)` labels each row with a group in ``[0, n)`` (every label present); result
    ``[i]`` `(n,)` is :func:`linear_cka` without the rows of group ``i``, i.e.
    :func:`cka_replicates` with 0/1 leave-out weights, computed without its `(n, m)` by
    `(m, m)` products: a sum over the kept rows is the sum over all rows less the group's own
    (``O(m^2)`` work instead of ``O(n m^2)``).
    """
    X = as_float64_matrix("X", X)
    Y = as_float64_matrix("Y", Y)
    Xc, Yc = X - X.mean(dim=0), Y - Y.mean(dim=0)
    K, L = Xc @ Xc.T, Yc @ Yc.T  # (m, m)
    group = torch.as_tensor(group, dtype=torch.long)
    n, m = int(group.max()) + 1, group.numel()
    kept = (group[None, :] != torch.arange(n)[:, None]).double()  # (n, m): 0/1 weights
    total = m - torch.bincount(group, minlength=n).double()  # (n,): rows kept

    def weighted(G: torch.Tensor) -> torch.Tensor:
        """``P @ G`` `(n, m)` for a symmetric `(m, m)` ``G``, ``P = kept / total``."""
        own = torch.zeros(n, m, dtype=torch.float64).index_add_(0, group, G)  # group row sums
        return (G.sum(dim=0) - own) / total[:, None]

    def hsic(product: torch.Tensor, GP: torch.Tensor, HP: torch.Tensor) -> torch.Tensor:
        """:func:`_weighted_hsic` from ``product = G o H`` and ``GP``, ``HP`` `(n, m)`."""
        return (
            (kept * weighted(product)).sum(dim=1) / total
            - 2 * (kept * GP * HP).sum(dim=1) / total
            + (kept * GP).sum(dim=1) / total * (kept * HP).sum(dim=1) / total
        )

    KP, LP = weighted(K), weighted(L)
    cross = hsic(K * L, KP, LP)
    scale = (hsic(K * K, KP, KP) * hsic(L * L, LP, LP)).clamp(min=0).sqrt()
    cka = torch.where(scale > 0, cross / scale.clamp(min=1e-300), torch.nan).clamp(0.0, 1.0)
    return cka.numpy()


def resolve_pairs(
    layers: Sequence[int], pairs: str | Sequence[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    """(source, target) layer pairs from a named set or an explicit list, ascending.

    ``layers`` are the captured layers. ``"adjacent"``: consecutive captured layers;
    ``"from_embedding"``: layer 0 to every other layer; ``"all"``: every source < target;
    None: ``from_embedding`` and ``adjacent`` together (``adjacent`` alone without layer 0).
    """
    layers = sorted(layers)
    adjacent = list(pairwise(layers))
    from_embedding = [(0, layer) for layer in layers if layer > 0] if 0 in layers else []
    if pairs is None:
        chosen = set(adjacent) | set(from_embedding)
    elif isinstance(pairs, str):
        if pairs not in PAIR_SETS:
            raise ValueError(
                f"pairs must be None, one of {PAIR_SETS} or a list of (source, target)"
            )
        if pairs == "from_embedding" and 0 not in layers:
            raise ValueError("pairs='from_embedding' needs layer 0 (the embeddings) in the capture")
        chosen = {
            "adjacent": set(adjacent),
            "from_embedding": set(from_embedding),
            "all": set(combinations(layers, 2)),
        }[pairs]
    else:
        chosen = set()
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in layers or pair[1] not in layers:
                raise ValueError(
                    f"pair {pair!r} must be (source, target) of captured layers {layers}"
                )
            if not pair[0] < pair[1]:
                raise ValueError(f"pair {pair!r}: the source layer must be below the target layer")
            chosen.add((int(pair[0]), int(pair[1])))
    if not chosen:
        raise ValueError(
            f"no layer pairs to score with captured layers {layers} and pairs={pairs!r}"
        )
    return sorted(chosen)


def _cka_with_interval(
    source: torch.Tensor,
    target: torch.Tensor,
    sample_anchor: torch.Tensor,
    with_interval: bool,
    level: float,
) -> tuple[float, float, float]:
    """CKA of pooled samples, with a leave-one-anchor-out jackknife interval.

    ``source`` `(m, d1)` and ``target`` `(m, d2)` are the samples' states and
    ``sample_anchor`` `(m,)` the anchor each sample belongs to. Not a bootstrap: resampled rows
    repeat, repeated rows look like agreement, and resampled CKA is biased upward (for
    unrelated layers its percentile interval misses the estimate). Leaving one anchor out
    repeats nothing. With ``n`` anchors, the interval is ``CKA +- z * SE_jackknife``,
    ``SE^2 = (n - 1) / n * sum_i (CKA_(-i) - mean)^2``, clipped to ``[0, 1]``.
    """
    value = linear_cka(source, target)
    if not with_interval:
        return value, math.nan, math.nan
    if source.shape[0] > CKA_INTERVAL_MAX_SAMPLES:
        warnings.warn(
            f"CKA interval skipped: {source.shape[0]} samples exceed {CKA_INTERVAL_MAX_SAMPLES}",
            stacklevel=3,
        )
        return value, math.nan, math.nan
    anchors, group = sample_anchor.unique(return_inverse=True)  # (n,), (m,)
    n = anchors.numel()
    replicates = leave_one_out_cka(source, target, group)  # (n,): replicate i drops anchor i
    spread = math.sqrt((n - 1) / n * float(((replicates - replicates.mean()) ** 2).sum()))
    half_width = NormalDist().inv_cdf(0.5 + level / 2) * spread
    return value, max(0.0, value - half_width), min(1.0, value + half_width)


def eclmf(
    cap: Capture,
    anchors: torch.Tensor,
    pairs: str | Sequence[tuple[int, int]] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float | None = None,
    level: float = DEFAULT_LEVEL,
    centered: bool = False,
) -> pd.DataFrame:
    """ECLMF, its chance level, normalized score, CKA and raw cosine for layer ``pairs``.

    ``anchors`` `(n_anchors,)` sorted unique positions kept by ``cap``; ``pairs`` as in
    :func:`resolve_pairs`; ``alpha`` fixes the ridge penalty (None: GCV). Returns a tidy frame
    (:data:`fidelity.schema.TIDY_COLUMNS`) with ``n`` = the samples used (batch x
    anchors without missing positions; see the module docstring); intervals are percentile
    bootstraps over anchors, except for CKA, whose interval is a normal leave-one-anchor-out
    jackknife (a bootstrap's repeated rows bias CKA upward); ``n_boot=0`` leaves all intervals
    NaN. ``centered=True`` takes the read-out cosines about the read-out's intercept (the mean
    source state of the fitting anchors; see :func:`fidelity.metrics.readout.readout_scores`).
    """
    anchors = validate_anchors(anchors, cap)
    if anchors.numel() < MIN_ANCHORS_PER_CELL:
        raise ValueError(
            f"ECLMF needs at least {MIN_ANCHORS_PER_CELL} anchors, got {anchors.numel()}"
        )
    chosen = resolve_pairs(cap.layers, pairs)
    folds = assign_folds(anchors.numel(), 2, seeded_generator(seed))
    counts = bootstrap_counts(anchors.numel(), n_boot, seed) if n_boot else None
    states = {layer: captured_states(cap, layer, anchors) for pair in chosen for layer in pair}
    anchor_index = torch.arange(anchors.numel())  # (n_anchors,)
    rows, missing = [], []
    for source, target in chosen:
        batch = states[source].shape[0]
        present = present_samples(states[source], states[target])  # (batch, n_anchors)
        if not enough_anchors(present, folds):
            missing.append((source, target))
            continue
        scores = pooled_readout_scores(
            states[target][None],
            states[source],
            present,
            folds,
            alpha,
            [seeded_generator(seed, source, target)],
            centered,
        )
        score = per_anchor_mean(scores.score[0], present).numpy()
        chance = per_anchor_mean(scores.chance[0], present).numpy()
        pooled_source, pooled_target = states[source][present], states[target][present]
        sample_anchor = anchor_index.expand(batch, -1)[present]  # (m,)
        values = {
            "eclmf": mean_with_interval(score, counts, level),
            "eclmf_chance": mean_with_interval(chance, counts, level),
            "eclmf_norm": normalized_with_interval(score, chance, counts, level),
            "cka": _cka_with_interval(
                pooled_source, pooled_target, sample_anchor, n_boot > 0, level
            ),
        }
        if pooled_source.shape[1] == pooled_target.shape[1]:
            raw = per_anchor_mean(rowwise_cosine(pooled_source, pooled_target), present)
            values["eclmf_raw"] = mean_with_interval(raw.numpy(), counts, level)
        n = int(present.sum())
        rows.extend(
            (metric, target, target - source, value, low, high, n, source)
            for metric, (value, low, high) in values.items()
        )
    skipped = (
        f"ECLMF skipped layer pairs {missing}: fewer than {MIN_ANCHORS_PER_CELL} anchors "
        f"({MIN_ANCHORS_PER_CELL // 2} per fold) are present in both layers (positions "
        "missing from the capture, e.g. dropped by DeciMamba's decimation)"
    )
    return tidy_frame(rows, skipped=skipped if missing else None)
