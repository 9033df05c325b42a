"""Horizontal memory fidelity: how much of token ``t`` layer ``l`` still holds at ``t + d``.

Notation: ``h[l][t]`` is the residual stream at layer ``l`` (the output of block ``l - 1``) at
position ``t``, and
``e[t] = h[0][t]`` the token embedding. For each layer ``l`` and distance ``d``, over the
anchors ``t`` with ``t + d < length``:

- ``etmf``: ``ETMF(l, d) = mean_t cos(e[t], R(h[l][t + d]))`` where ``R`` is a ridge read-out
  from layer ``l`` to the embeddings, cross-fitted over two anchor folds (an anchor is never
  scored by a read-out fitted on it; see :mod:`fidelity.metrics.readout`).
- ``etmf_chance``: the identical procedure with each ``e[t]`` paired with ``h[l][t' + d]`` of
  an unrelated anchor ``t'`` (a random permutation within folds).
- ``etmf_norm``: ``(ETMF - chance) / (1 - chance)``: 0 at chance, 1 for a perfect read-out.
- ``etmf_acc``: fraction of samples whose ``R(h[l][t + d])`` is nearest (cosine) to the row of
  ``embedding`` `(vocab, d_model)` of the true token ``t`` (only when ``embedding`` is given).
- ``etmf_raw``: ``mean_t cos(h[l][t], h[l][t + d])``, no read-out.

With ``batch > 1`` the (sequence, anchor) pairs are pooled as samples; per-anchor values are
averaged over the batch and confidence intervals are percentile bootstraps over anchors.

Missing samples: a captured state that holds NaN is a position absent from its layer (a capture
of DeciMamba stores positions dropped by decimation so). A (layer, distance) cell uses the
samples whose pair exists in that layer (``e[t]`` and ``h[l][t + d]`` for the read-out metrics,
``h[l][t]`` and ``h[l][t + d]`` for ``etmf_raw``): the read-out is fitted and scored on those
alone, an anchor's value is the mean over the sequences that have its pair, anchors with none
are left out, ``n`` counts the samples used, and a cell with fewer than
:data:`MIN_ANCHORS_PER_CELL` such anchors (or fewer than half that in a fold) is skipped with a
warning. Without missing samples this is exactly the computation above.

``centered=True`` (what :func:`fidelity.analyze` uses; this module's default, False, keeps
DESIGN.md's formula above) measures the read-out
cosines about the read-out's intercept, ``cos(e[t] - mu, R(h) - mu)`` with ``mu`` the mean
embedding of the fitting anchors. Uncentred, a mean direction shared by the embeddings enters
every prediction, and its weight grows as the read-out shrinks with distance: on a linear
recurrence ``h_t = a h_(t-1) + e_t`` the uncentred normalized curve then falls faster than
``a^d`` (see tests/test_etmf.py), while the centred one decays at rate ``a``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import pandas as pd
import torch

from fidelity.metrics.curves import (
    DEFAULT_LEVEL,
    CurveSummary,
    bootstrap_counts,
    normalized_rows_with_interval,
    rows_with_interval,
    summarize_curve,
)
from fidelity.metrics.readout import rowwise_cosine
from fidelity.metrics.sampling import assign_folds, seeded_generator
from fidelity.metrics.toolkit import (
    MIN_ANCHORS_PER_CELL,
    captured_layers,
    captured_states,
    enough_anchors,
    per_anchor_mean,
    pooled_readout_scores,
    present_samples,
    require_kept,
    tidy_frame,
    validate_anchors,
)
from fidelity.probes.capture_types import Capture
from fidelity.schema import CURVE_SUMMARY_COLUMNS, SUMMARY_STATISTICS

MIN_SCORED_DISTANCES = 3
"""A layer's forgetting curve is fitted (``a``, ``tau``, ``c``) only with this many distances."""

_ACCURACY_CHUNK = 4096  # predictions compared with the vocabulary at a time
_STACK_ELEMENTS = 2**22  # state values (float64) of the layers whose read-outs run together

T = TypeVar("T")
R = TypeVar("R")


def _validate_distances(distances: object) -> torch.Tensor:
    distances = torch.as_tensor(distances)
    if distances.dim() != 1 or distances.numel() == 0 or distances.dtype.is_floating_point:
        raise ValueError(f"distances must be a non-empty 1-D integer tensor, got {distances!r}")
    if distances.min() < 0:
        raise ValueError(f"distances must be non-negative, got minimum {int(distances.min())}")
    return torch.unique(distances.long())


def nearest_token_accuracy(
    prediction: torch.Tensor, tokens: torch.Tensor, embedding: torch.Tensor
) -> torch.Tensor:
    """Whether each prediction is nearest (cosine) to its true token's embedding row.

    ``prediction`` `(m, d_model)`, ``tokens`` `(m,)` token ids, ``embedding``
    `(vocab, d_model)`. Returns `(m,)` bool. Similarities are computed in float32, in chunks.
    """
    if embedding.dim() != 2 or embedding.shape[1] != prediction.shape[1]:
        raise ValueError(
            f"embedding must be (vocab, d_model={prediction.shape[1]}), "
            f"got {tuple(embedding.shape)}"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= embedding.shape[0]):
        raise ValueError(f"token ids must lie in [0, vocab={embedding.shape[0]})")
    rows = embedding.detach().to(device="cpu", dtype=torch.float32)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30)  # (vocab, d_model)
    queries = prediction.to(torch.float32)
    queries = queries / queries.norm(dim=1, keepdim=True).clamp(min=1e-30)  # (m, d_model)
    nearest = torch.cat(
        [(chunk @ rows.T).argmax(dim=1) for chunk in queries.split(_ACCURACY_CHUNK)]
    )  # (m,)
    return nearest == tokens.to(nearest.device)


def _anchor_tokens(cap: Capture, anchors: torch.Tensor, embedding: object) -> torch.Tensor:
    """Token ids `(batch, n_anchors)` at the anchors, checked against ``embedding``."""
    if not isinstance(embedding, torch.Tensor):
        raise TypeError(
            f"embedding must be a (vocab, d_model) tensor, got {type(embedding).__name__}"
        )
    d_model = cap[0].shape[-1]
    if embedding.dim() != 2 or embedding.shape[1] != d_model:
        raise ValueError(
            f"embedding must be (vocab, d_model={d_model}), got {tuple(embedding.shape)}"
        )
    tokens = cap.tokens[:, cap.index_of(anchors)].detach().cpu().long()  # (batch, n_anchors)
    if tokens.min() < 0 or tokens.max() >= embedding.shape[0]:
        raise ValueError(f"token ids must lie in [0, vocab={embedding.shape[0]})")
    return tokens


def _stacks(
    cells: list[tuple[int, torch.Tensor]], elements_per_cell: int, stack_elements: int
) -> list[tuple[list[int], torch.Tensor]]:
    """Group cells ``(layer index, present (batch, n))`` with the same present samples into
    stacks scored at once, each holding at most ``stack_elements`` state values
    (``elements_per_cell`` per cell). Returns ``(layer indices, present)`` per stack."""
    per_stack = max(1, stack_elements // max(elements_per_cell, 1))
    groups: list[tuple[list[int], torch.Tensor]] = []
    for i, present in cells:
        same = (g for g in groups if len(g[0]) < per_stack and torch.equal(g[1], present))
        group = next(same, None)
        if group is None:
            groups.append(([i], present))
        else:
            group[0].append(i)
    return groups


@dataclass(frozen=True)
class EtmfPerAnchor:
    """Per-anchor ETMF values, before averaging.

    ``score``, ``chance``, ``raw`` and ``accuracy`` (None without an embedding matrix) are
    `(n_layers, n_dist, n_anchors)` float64, each entry averaged over the sequences that have
    the sample, NaN where ``anchors[i] + distances[j] >= length``, the distance had too few
    valid anchors, no sequence has the sample (missing positions), or the cell was skipped.
    Valid anchors form a prefix: ``n_valid`` `(n_dist,)` counts them (0 for skipped
    distances). ``n_samples`` `(n_layers, n_dist)` counts the (sequence, anchor) samples each
    read-out cell used (``batch * n_valid`` without missing positions, 0 for a skipped cell);
    ``n_raw_samples`` the same for ``raw``. ``batch`` is the number of sequences pooled.
    """

    layers: list[int]
    distances: torch.Tensor
    anchors: torch.Tensor
    score: torch.Tensor
    chance: torch.Tensor
    raw: torch.Tensor
    accuracy: torch.Tensor | None
    n_valid: torch.Tensor
    batch: int
    n_samples: torch.Tensor
    n_raw_samples: torch.Tensor


@dataclass(frozen=True)
class _DistanceScores:
    """What :func:`_score_distance` finds at one distance for the ``valid`` anchors: ``score``,
    ``chance``, ``raw`` and ``accuracy`` (None without an embedding) `(n_layers, valid)`,
    ``n_samples`` and ``n_raw_samples`` `(n_layers,)`, and the layers skipped for missing
    samples."""

    valid: int
    score: torch.Tensor
    chance: torch.Tensor
    raw: torch.Tensor
    accuracy: torch.Tensor | None
    n_samples: torch.Tensor
    n_raw_samples: torch.Tensor
    missing: list[int]


def _score_distance(
    cap: Capture,
    anchors: torch.Tensor,
    distance: int,
    layers: list[int],
    targets: torch.Tensor,
    at_anchors: list[torch.Tensor],
    folds: torch.Tensor,
    tokens: torch.Tensor | None,
    embedding: torch.Tensor | None,
    alpha: float | None,
    seed: int,
    centered: bool,
    stack_elements: int,
) -> _DistanceScores | None:
    """Every layer's per-anchor ETMF at ``distance`` (None when fewer than
    :data:`MIN_ANCHORS_PER_CELL` anchors have ``t + d`` inside the sequence).

    ``targets`` `(batch, n_anchors, d_model)` are ``e[t]``, ``at_anchors[i]`` the states of
    ``layers[i]`` at the anchors, ``folds`` `(n_anchors,)`, ``tokens`` `(batch, n_anchors)` (with
    ``embedding``); stacks of layers hold at most ``stack_elements`` state values.
    """
    valid = int((anchors + distance < cap.length).sum())  # anchors are sorted: a prefix
    if valid < MIN_ANCHORS_PER_CELL:
        return None
    shifted = anchors[:valid] + distance  # (valid,)
    require_kept(cap, shifted)
    states = [captured_states(cap, layer, shifted) for layer in layers]  # (batch, valid, d)
    batch = targets.shape[0]
    shape = (len(layers), valid)
    score, chance, raw = (torch.full(shape, torch.nan, dtype=torch.float64) for _ in range(3))
    accuracy = None if embedding is None else torch.full(shape, torch.nan, dtype=torch.float64)
    n_samples = torch.zeros(len(layers), dtype=torch.long)
    n_raw_samples = torch.zeros_like(n_samples)
    cells, missing = [], []  # (i, present) of the cells to score; layers without enough
    for i, layer in enumerate(layers):
        present = present_samples(states[i], targets[:, :valid])  # (batch, valid)
        if enough_anchors(present, folds[:valid]):
            cells.append((i, present))
        else:
            missing.append(layer)
    per_cell = batch * valid * targets.shape[-1]
    for stack, present in _stacks(cells, per_cell, stack_elements):
        scores = pooled_readout_scores(
            torch.stack([states[i] for i in stack]),
            targets[:, :valid],
            present,
            folds[:valid],
            alpha,
            [seeded_generator(seed, layers[i], distance) for i in stack],
            centered,
        )  # (k, m, ...) for the k layers of the stack
        n_samples[stack] = int(present.sum())
        score[stack] = per_anchor_mean(scores.score, present)
        chance[stack] = per_anchor_mean(scores.chance, present)
        if accuracy is not None:
            hits = nearest_token_accuracy(
                scores.prediction.flatten(0, 1),
                tokens[:, :valid][present].repeat(len(stack)),
                embedding,
            )  # (k * m,)
            hits = hits.double().reshape(len(stack), -1)
            accuracy[stack] = per_anchor_mean(hits, present)
    for i in range(len(layers)):
        origin = at_anchors[i][:, :valid]  # (batch, valid, d_model): h[l][t]
        raw_present = present_samples(origin, states[i])
        if int(raw_present.any(dim=0).sum()) >= MIN_ANCHORS_PER_CELL:
            cosines = rowwise_cosine(origin[raw_present], states[i][raw_present])  # (m_raw,)
            raw[i] = per_anchor_mean(cosines, raw_present)
            n_raw_samples[i] = int(raw_present.sum())
    return _DistanceScores(valid, score, chance, raw, accuracy, n_samples, n_raw_samples, missing)


def _check_workers(workers: object, n_cells: int) -> int:
    """The threads to score ``n_cells`` distances with: ``workers`` (None: torch's thread
    count), at most one per distance, at least one."""
    if workers is None:
        workers = torch.get_num_threads()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return max(1, min(workers, n_cells))


def _map_distances(function: Callable[[T], R], cells: Sequence[T], workers: int) -> list[R]:
    """``[function(cell) for cell in cells]``, computed by ``workers`` threads.

    A distance's read-outs are many small products and eigendecompositions that two torch
    threads do not speed up (measured: the same time as one); distances side by side do, since
    torch releases the GIL inside its operations. While the threads run, torch uses one thread
    per operation (restored afterwards), so they do not oversubscribe the cores. Every cell is
    computed exactly as it would be alone.
    """
    if workers <= 1:
        return [function(cell) for cell in cells]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="etmf") as pool:
            return list(pool.map(function, cells))
    finally:
        torch.set_num_threads(threads)


def etmf_per_anchor(
    cap: Capture,
    anchors: torch.Tensor,
    distances: torch.Tensor,
    layers: Sequence[int] | None = None,
    embedding: torch.Tensor | None = None,
    alpha: float | None = None,
    seed: int = 0,
    centered: bool = False,
    workers: int | None = None,
) -> EtmfPerAnchor:
    """Per-anchor ETMF for ``layers`` (default: all captured) at ``distances`` `(n_dist,)`.

    ``anchors`` `(n_anchors,)` sorted unique positions; ``cap`` must hold layer 0 and the
    positions ``required_positions(anchors, distances, cap.length)``. ``embedding``
    `(vocab, d_model)` enables the nearest-token accuracy; ``alpha`` fixes the ridge penalty
    (None: GCV). Distances with fewer than :data:`MIN_ANCHORS_PER_CELL` valid anchors are
    skipped with a warning. NaN states are samples missing from their layer (see the module
    docstring): each cell uses the samples whose pair exists, and a cell with too few is
    skipped with a warning. Folds, chance permutations and all randomness derive from
    ``seed``. ``centered=True`` takes the read-out cosines about the read-out's intercept (the
    mean embedding of the fitting anchors; see
    :func:`fidelity.metrics.readout.readout_scores`).

    ``workers``: distances scored at once, in threads (default: torch's thread count; see
    :func:`_map_distances`). The values do not depend on it.
    """
    anchors = validate_anchors(anchors, cap)
    distances = _validate_distances(distances)
    layers = captured_layers(cap, layers)
    if 0 not in cap:
        raise ValueError("ETMF needs layer 0 (the token embeddings e[t]) in the capture")
    targets = captured_states(cap, 0, anchors)  # (batch, n_anchors, d_model)
    batch, n_anchors, _ = targets.shape
    tokens = None if embedding is None else _anchor_tokens(cap, anchors, embedding)
    folds = assign_folds(n_anchors, 2, seeded_generator(seed))
    shape = (len(layers), distances.numel(), n_anchors)
    score, chance, raw = (torch.full(shape, torch.nan, dtype=torch.float64) for _ in range(3))
    accuracy = None if embedding is None else torch.full(shape, torch.nan, dtype=torch.float64)
    n_valid = torch.zeros(distances.numel(), dtype=torch.long)
    n_samples = torch.zeros(len(layers), distances.numel(), dtype=torch.long)
    n_raw_samples = torch.zeros_like(n_samples)
    skipped, missing = [], []
    at_anchors = [captured_states(cap, layer, anchors) for layer in layers]
    cells = list(enumerate(distances.tolist()))
    workers = _check_workers(workers, len(cells))
    scored = _map_distances(
        lambda cell: _score_distance(
            cap,
            anchors,
            cell[1],
            layers,
            targets,
            at_anchors,
            folds,
            tokens,
            embedding,
            alpha,
            seed,
            centered,
            _STACK_ELEMENTS // workers,  # the threads together hold what one would
        ),
        cells,
        workers,
    )
    for (j, distance), cell in zip(cells, scored, strict=True):
        if cell is None:
            skipped.append(distance)
            continue
        valid = cell.valid
        n_valid[j] = valid
        score[:, j, :valid] = cell.score
        chance[:, j, :valid] = cell.chance
        raw[:, j, :valid] = cell.raw
        if accuracy is not None:
            accuracy[:, j, :valid] = cell.accuracy
        n_samples[:, j] = cell.n_samples
        n_raw_samples[:, j] = cell.n_raw_samples
        missing.extend((layer, distance) for layer in cell.missing)
    if skipped:
        warnings.warn(
            f"ETMF skipped distances {skipped}: fewer than {MIN_ANCHORS_PER_CELL} anchors have "
            "t + d inside the sequence",
            stacklevel=2,
        )
    if missing:
        warnings.warn(
            f"ETMF skipped (layer, distance) cells {missing}: fewer than "
            f"{MIN_ANCHORS_PER_CELL} anchors ({MIN_ANCHORS_PER_CELL // 2} per fold) have both "
            "e[t] and h[l][t + d] in the layer (positions missing from the capture, e.g. "
            "dropped by DeciMamba's decimation)",
            stacklevel=2,
        )
    return EtmfPerAnchor(
        layers,
        distances,
        anchors,
        score,
        chance,
        raw,
        accuracy,
        n_valid,
        batch,
        n_samples,
        n_raw_samples,
    )


def etmf_frame(
    result: EtmfPerAnchor, n_boot: int = 200, seed: int = 0, level: float = DEFAULT_LEVEL
) -> pd.DataFrame:
    """Tidy frame (:data:`~fidelity.schema.TIDY_COLUMNS`) of per-anchor ETMF values with
    bootstrap intervals.

    Metrics ``etmf``, ``etmf_chance``, ``etmf_norm``, ``etmf_acc`` (if computed) and
    ``etmf_raw``; ``n`` = the samples used (batch x valid anchors without missing positions).
    Intervals resample the valid anchors of each distance (the same replicates for every layer
    and metric; anchors without a sample in a cell are left out of its means); ``n_boot=0``
    leaves them NaN. Skipped cells have no rows.
    """
    rows = []
    for j, distance in enumerate(result.distances.tolist()):
        valid = int(result.n_valid[j])
        if valid == 0:
            continue
        counts = bootstrap_counts(valid, n_boot, [seed, distance]) if n_boot else None
        scored = [i for i in range(len(result.layers)) if result.n_samples[i, j] > 0]
        score = result.score[scored, j, :valid].numpy()  # (n_scored, valid)
        chance = result.chance[scored, j, :valid].numpy()
        values = {
            "etmf": rows_with_interval(score, counts, level),
            "etmf_chance": rows_with_interval(chance, counts, level),
            "etmf_norm": normalized_rows_with_interval(score, chance, counts, level),
        }  # (n_scored, 3) each
        if result.accuracy is not None:
            accuracy = result.accuracy[scored, j, :valid].numpy()
            values["etmf_acc"] = rows_with_interval(accuracy, counts, level)
        raw = rows_with_interval(result.raw[:, j, :valid].numpy(), counts, level)
        for row, i in enumerate(scored):
            layer, n = result.layers[i], int(result.n_samples[i, j])
            rows.extend(
                (metric, layer, distance, *map(float, cells[row]), n, layer)
                for metric, cells in values.items()
            )
            n_raw = int(result.n_raw_samples[i, j])
            if n_raw:
                rows.append(("etmf_raw", layer, distance, *map(float, raw[i]), n_raw, layer))
    return tidy_frame(rows)


def etmf(
    cap: Capture,
    anchors: torch.Tensor,
    distances: torch.Tensor,
    layers: Sequence[int] | None = None,
    embedding: torch.Tensor | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float | None = None,
    centered: bool = False,
) -> pd.DataFrame:
    """ETMF of ``cap`` as a tidy frame: :func:`etmf_per_anchor` then :func:`etmf_frame`.

    ``anchors`` `(n_anchors,)`, ``distances`` `(n_dist,)`, ``embedding`` `(vocab, d_model)` or
    None; see those functions for the definitions and the columns.
    """
    result = etmf_per_anchor(cap, anchors, distances, layers, embedding, alpha, seed, centered)
    return etmf_frame(result, n_boot, seed)


def etmf_summary(
    result: EtmfPerAnchor, n_boot: int = 200, seed: int = 0, level: float = DEFAULT_LEVEL
) -> pd.DataFrame:
    """Per-layer summary of the normalized ETMF curve, one row per layer.

    Columns (:data:`~fidelity.schema.CURVE_SUMMARY_COLUMNS`; ``_low``/``_high`` bootstrap
    intervals over anchors): ``farthest_distance`` (largest distance with normalized ETMF >= 0.5),
    ``peak_distance`` (distance beyond 0 where it is highest) and ``peak_value`` (its value
    there), ``memory_mass`` (area over log2-distance), ``contiguous_length`` (largest distance
    up to which it never drops below 0.5), ``half_life`` (NaN unless ``decaying``),
    ``half_life_r2`` (goodness of the exponential fit, NaN unless it converged), ``decaying``,
    the fit ``a * exp(-d / tau) + c`` (``tau``, ``amplitude``, ``offset``, ``converged``) and
    ``n_boot_converged``.
    See :func:`fidelity.metrics.curves.summarize_curve`; ETMF at chosen distances is in
    :func:`etmf_frame`. A layer scored at fewer than :data:`MIN_SCORED_DISTANCES` distances
    (cells skipped for missing positions) gets no fit (NaN fit columns) but the other
    statistics over the distances it has; a layer scored at none is left out. Both warn.
    """
    rows, unfitted, unscored = [], [], []
    distances = result.distances.numpy()
    for i, layer in enumerate(result.layers):
        n_scored = int((result.n_samples[i] > 0).sum())
        if n_scored == 0:
            unscored.append(layer)
            continue
        if n_scored < MIN_SCORED_DISTANCES:
            unfitted.append(layer)
        summary = summarize_curve(
            distances, result.score[i], result.chance[i], n_boot=n_boot, seed=seed, level=level
        )
        rows.append(_summary_row(layer, summary))
    if unfitted or unscored:
        warnings.warn(
            f"ETMF summary: layers {unfitted} have values at fewer than {MIN_SCORED_DISTANCES} "
            f"distances (no curve fit) and layers {unscored} at none (left out), because "
            "positions are missing from them",
            stacklevel=2,
        )
    frame = pd.DataFrame(rows, columns=list(CURVE_SUMMARY_COLUMNS))
    return frame.astype({"layer": int, "decaying": bool, "converged": bool})


def _summary_row(layer: int, summary: CurveSummary) -> dict:
    """One :data:`~fidelity.schema.CURVE_SUMMARY_COLUMNS` row from a layer's
    :class:`CurveSummary`."""
    statistics = {
        "farthest_distance": summary.farthest,
        "peak_distance": summary.peak,
        "memory_mass": summary.mass,
        "contiguous_length": summary.contiguous,
    }
    row: dict[str, object] = {"layer": layer}
    for name in SUMMARY_STATISTICS:
        if name == "half_life":
            value, (low, high) = summary.half_life, summary.half_life_ci
        else:
            value, low, high = statistics[name].value, statistics[name].low, statistics[name].high
        row |= {name: value, f"{name}_low": low, f"{name}_high": high}
    fit = summary.fit
    nan = math.nan
    return row | {
        "peak_value": summary.peak_value,
        "half_life_r2": summary.r2,
        "decaying": summary.decaying,
        "tau": nan if fit is None else fit.tau,
        "amplitude": nan if fit is None else fit.a,
        "offset": nan if fit is None else fit.c,
        "converged": fit is not None and fit.converged,
        "n_boot_converged": summary.n_boot_converged,
    }
