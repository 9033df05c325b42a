"""Which positions the metrics look at: anchors, distances, cross-fitting folds.

Metrics never touch all positions of a long sequence. They take a few hundred *anchor*
positions ``t`` and a set of log-spaced *distances* ``d``; a capture then only has to keep the
positions ``t`` and ``t + d`` (:func:`required_positions`), which keeps every run linear in the
sequence length.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch

from fidelity.errors import InputError

DEFAULT_ANCHORS = 512
"""Anchors per run: enough for two-fold read-outs and percentile bootstrap intervals."""

DEFAULT_DISTANCES_PER_OCTAVE = 3
"""Log spacing of default distances: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, ... (deduplicated)."""

MIN_VALID_ANCHORS = 64
"""Default distances stop where fewer than about this many anchors still have ``t + d`` inside."""


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise InputError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_positions(name: str, positions: torch.Tensor, length: int) -> torch.Tensor:
    """``positions`` `(n,)` checked to be integer positions in ``[0, length)``, as long."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of positions, got {type(positions).__name__}"
        )
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise InputError(
            f"{name} must be a 1-D integer tensor, got {positions.dim()}-D {positions.dtype}"
        )
    if positions.numel() and (positions.min() < 0 or positions.max() >= length):
        raise InputError(
            f"{name} must lie in [0, {length}), got range [{positions.min()}, {positions.max()}]"
        )
    return positions.long()


def sample_anchors(
    length: int, n_anchors: int = DEFAULT_ANCHORS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw anchor positions uniformly without replacement.

    Returns `(min(n_anchors, length),)` sorted, unique long positions in ``[0, length)``; when
    ``length <= n_anchors`` every position is an anchor.
    """
    length = _check_positive_int("length", length)
    n_anchors = _check_positive_int("n_anchors", n_anchors)
    if n_anchors >= length:
        return torch.arange(length, dtype=torch.long)
    chosen = torch.randperm(length, generator=generator)[:n_anchors]
    return chosen.sort().values


def default_min_valid(n_anchors: int) -> int:
    """Anchors that must remain valid (``t + d < length``) at the largest default distance.

    ``max(n_anchors // 8, min(64, n_anchors // 2))``: 64 of 512 anchors, an eighth of larger
    sets, and half of very small ones (so short sequences still get a few distances).
    """
    n_anchors = _check_positive_int("n_anchors", n_anchors)
    return max(n_anchors // 8, min(MIN_VALID_ANCHORS, n_anchors // 2), 1)


def default_distances(
    length: int,
    n_anchors: int = DEFAULT_ANCHORS,
    per_octave: int = DEFAULT_DISTANCES_PER_OCTAVE,
) -> torch.Tensor:
    """Distances to probe: 0 plus log-spaced integers, as far as enough anchors remain.

    The candidates are ``round(2 ** (k / per_octave))`` for ``k = 0, 1, ...`` (deduplicated:
    1, 2, 3, 4, 5, 6, 8, 10, 13, 16, ... for three per octave). They stop at
    ``d_max = floor(length * (1 - m / n))`` with ``n = min(n_anchors, length)`` and
    ``m = default_min_valid(n)``: the largest distance at which uniformly drawn anchors still
    have, in expectation, ``m`` positions with ``t + d < length`` (exactly so when every
    position is an anchor). Returns `(n_dist,)` sorted unique long distances starting at 0.
    """
    length = _check_positive_int("length", length)
    n_anchors = min(_check_positive_int("n_anchors", n_anchors), length)
    per_octave = _check_positive_int("per_octave", per_octave)
    d_max = math.floor(length * (1 - default_min_valid(n_anchors) / n_anchors))
    distances = {0}
    k = 0
    while (candidate := round(2 ** (k / per_octave))) <= d_max:
        distances.add(candidate)
        k += 1
    return torch.tensor(sorted(distances), dtype=torch.long)


def required_positions(anchors: torch.Tensor, distances: torch.Tensor, length: int) -> torch.Tensor:
    """Positions a capture must keep to score ``anchors`` `(n_anchors,)` at ``distances``.

    Returns `(n_pos,)` sorted unique long positions: the anchors and every ``t + d`` below
    ``length``.
    """
    length = _check_positive_int("length", length)
    anchors = check_positions("anchors", anchors, length)
    if not isinstance(distances, torch.Tensor):
        distances = torch.as_tensor(distances)
    if distances.dim() != 1 or distances.dtype.is_floating_point:
        raise InputError(
            f"distances must be a 1-D integer tensor, got {distances.dim()}-D {distances.dtype}"
        )
    if distances.numel() and distances.min() < 0:
        raise InputError(f"distances must be non-negative, got minimum {distances.min()}")
    shifted = anchors[:, None] + distances.long()[None, :]  # (n_anchors, n_dist)
    kept = torch.cat([anchors, shifted[shifted < length]])
    return torch.unique(kept)


def estimate_positions(length: int, n_anchors: int, n_dist: int) -> int:
    """Upper bound on ``len(required_positions(...))`` for memory planning.

    ``min(length, min(n_anchors, length) * (n_dist + 1))``: each anchor adds itself and at most
    one position per distance.
    """
    length = _check_positive_int("length", length)
    n_anchors = _check_positive_int("n_anchors", n_anchors)
    if isinstance(n_dist, bool) or not isinstance(n_dist, Integral) or n_dist < 0:
        raise InputError(f"n_dist must be a non-negative int, got {n_dist!r}")
    return min(length, min(n_anchors, length) * (int(n_dist) + 1))


def assign_folds(
    n_anchors: int, n_folds: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random, position-balanced cross-fitting folds for sorted anchors.

    Consecutive anchors are grouped ``n_folds`` at a time and each group gets a random
    permutation of the fold labels, so every prefix of the anchors (the anchors still valid at
    a given distance) is split as evenly as possible and early and late positions are spread
    over all folds. Returns `(n_anchors,)` long labels in ``[0, n_folds)``.
    """
    n_anchors = _check_positive_int("n_anchors", n_anchors)
    n_folds = _check_positive_int("n_folds", n_folds)
    if n_folds < 2:
        raise InputError(f"n_folds must be at least 2 for cross-fitting, got {n_folds}")
    n_groups = -(-n_anchors // n_folds)
    keys = torch.rand(n_groups, n_folds, generator=generator, dtype=torch.float64)
    labels = keys.argsort(dim=1)  # (n_groups, n_folds): a permutation of fold labels per group
    return labels.reshape(-1)[:n_anchors]


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` (e.g. a layer and a distance).

    Each (seed, keys) combination gets its own stream, so a result for one layer and distance
    does not depend on which other layers or distances were computed alongside it.
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    state = np.random.SeedSequence([int(seed), *(int(key) for key in keys)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
