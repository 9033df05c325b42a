"""What every metric shares: the tidy columns, access to captured states, sample presence,
the ridge read-out on present samples, the run policy of a model, and the frame tail.

A metric is one module under :mod:`fidelity.metrics` that returns a tidy frame
(:data:`TIDY_COLUMNS`, built with :func:`tidy_frame`) plus one entry in
:data:`fidelity.analysis.METRIC_RUNNERS` (see the README, "Adding a metric"). Metrics that
read a :class:`~fidelity.probes.capture_types.Capture` use :func:`captured_states`,
:func:`validate_anchors` and :func:`require_kept`; metrics that run the model themselves ask it
how to be run (:func:`resolve_chunk_size`, :func:`is_causal`, :func:`returns_all_positions`)
instead of testing for model classes.

Missing samples: a captured state that holds NaN is a position absent from its layer (a
capture of DeciMamba stores positions dropped by decimation so); :func:`present_samples`,
:func:`enough_anchors`, :func:`pooled_readout_scores` and :func:`per_anchor_mean` score what is
present.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from numbers import Integral

import pandas as pd
import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.metrics.readout import ReadoutScores, stacked_readout_scores
from fidelity.metrics.sampling import check_positions
from fidelity.models.base import CausalLM
from fidelity.probes.capture_types import Capture
from fidelity.schema import TIDY_COLUMNS, TIDY_INTEGER_COLUMNS

__all__ = [
    "MIN_ANCHORS_PER_CELL",
    "TIDY_COLUMNS",
    "captured_layers",
    "captured_states",
    "check_chunk_size",
    "enough_anchors",
    "is_causal",
    "per_anchor_mean",
    "pooled_readout_scores",
    "present_samples",
    "require_kept",
    "resolve_chunk_size",
    "returns_all_positions",
    "tidy_frame",
    "validate_anchors",
]

MIN_ANCHORS_PER_CELL = 8
"""A (layer, distance) cell needs this many valid anchors (4 per fold) to be scored."""


# -- the frame tail ---------------------------------------------------------------------------
def tidy_frame(
    rows: Iterable[tuple],
    *,
    columns: Sequence[str] = TIDY_COLUMNS,
    skipped: str | None = None,
) -> pd.DataFrame:
    """A metric's rows as a frame with ``columns`` (default :data:`TIDY_COLUMNS`; extra
    columns after them), the integer columns cast to int64. ``skipped``: a message saying
    which cells were left out and why, warned (once) when given."""
    if skipped:
        warnings.warn(skipped, stacklevel=3)
    frame = pd.DataFrame(list(rows), columns=list(columns))
    return frame.astype({c: int for c in TIDY_INTEGER_COLUMNS if c in frame.columns})


# -- captured states --------------------------------------------------------------------------
def captured_states(cap: Capture, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """States of ``layer`` at ``positions`` `(n,)` as CPU float64 `(batch, n, d_model)`."""
    return cap.at(layer, positions).detach().to(device="cpu", dtype=torch.float64)


def captured_layers(cap: Capture, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the capture (None: every captured layer), ascending."""
    if layers is None:
        return cap.layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of ints or None, got {type(layers).__name__}")
    missing = [layer for layer in layers if layer not in cap]
    if missing:
        raise ValueError(f"layers {missing} were not captured; captured layers: {cap.layers}")
    return sorted(set(layers))


def validate_anchors(anchors: object, cap: Capture) -> torch.Tensor:
    """Check that ``anchors`` `(n_anchors,)` are sorted, unique and kept by ``cap``.

    Returns them as a long tensor; raises ``TypeError``/``ValueError`` saying what is wrong.
    """
    if not isinstance(cap, Capture):
        raise TypeError(f"expected a fidelity Capture, got {type(cap).__name__}")
    anchors = check_positions("anchors", torch.as_tensor(anchors), cap.length)
    if anchors.numel() == 0:
        raise InputError("anchors is empty; draw some with sample_anchors(length)")
    if anchors.numel() > 1 and not bool((anchors[1:] > anchors[:-1]).all()):
        raise InputError("anchors must be sorted and unique (as sample_anchors returns them)")
    require_kept(cap, anchors)
    return anchors


def require_kept(cap: Capture, positions: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``cap`` kept every position in ``positions``."""
    try:
        cap.index_of(positions)
    except KeyError as missing:
        raise InputError(
            f"the capture lacks positions the metric needs ({missing.args[0]}); capture "
            "required_positions(anchors, distances, length)"
        ) from None


# -- present samples --------------------------------------------------------------------------
def present_samples(*states: torch.Tensor) -> torch.Tensor:
    """Which (sequence, anchor) samples exist in every one of ``states`` `(batch, n, d)`.

    Returns `(batch, n)` bool: False where any of the states holds NaN (a position missing from
    its layer; see :func:`fidelity.capture`).
    """
    present = ~torch.isnan(states[0]).any(dim=-1)
    for more in states[1:]:
        present &= ~torch.isnan(more).any(dim=-1)
    return present


def enough_anchors(present: torch.Tensor, folds: torch.Tensor) -> bool:
    """Whether the anchors with a sample in ``present`` `(batch, n)` can be scored with
    ``folds`` `(n,)`: at least :data:`MIN_ANCHORS_PER_CELL` of them, half that in every fold."""
    sampled = present.any(dim=0)  # (n,)
    if int(sampled.sum()) < MIN_ANCHORS_PER_CELL:
        return False
    per_fold = torch.bincount(folds[sampled], minlength=int(folds.max()) + 1)
    return bool((per_fold >= MIN_ANCHORS_PER_CELL // 2).all())


def pooled_readout_scores(
    states: torch.Tensor,
    targets: torch.Tensor,
    present: torch.Tensor,
    folds: torch.Tensor,
    alpha: float | None,
    generators: Sequence[torch.Generator],
    centered: bool,
) -> ReadoutScores:
    """:func:`~fidelity.metrics.readout.stacked_readout_scores` on the present samples only.

    ``states`` `(k, batch, n, d_in)` (``k`` state tensors sharing the targets and the
    samples' presence, e.g. layers), ``targets`` `(batch, n, d_out)`, ``present`` `(batch, n)`
    bool, ``folds`` `(n,)` anchor folds, ``generators`` one per state tensor. The ``m``
    present samples, in row-major order, are pooled with their anchors' folds; the result's
    tensors are `(k, m, ...)`. With every sample present, slice ``i`` is exactly
    ``readout_scores(states[i], targets, folds, alpha, generators[i], centered)``, flattened.
    """
    sample_folds = folds.expand(present.shape[0], -1)[present]  # (m,)
    return stacked_readout_scores(
        states[:, present], targets[present], sample_folds, alpha, generators, centered
    )


def per_anchor_mean(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Average pooled sample ``values`` `(..., m)` per anchor.

    ``values`` follow the True entries of ``present`` `(batch, n)` in row-major order (as
    ``x[present]`` does). Returns `(..., n)` float64: the mean over the sequences that have the
    anchor's sample, NaN for anchors with none.
    """
    full = torch.full((*values.shape[:-1], *present.shape), torch.nan, dtype=torch.float64)
    full[..., present] = values.to(torch.float64)  # (..., batch, n)
    return full.nanmean(dim=-2)


# -- run policy -------------------------------------------------------------------------------
def check_chunk_size(chunk_size: object) -> None:
    """Refuse a ``chunk_size`` that is not ``"auto"``, None or a positive int."""
    if chunk_size in ("auto", None):
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise InputError(
            f"chunk_size must be a positive integer, 'auto' or None; got {chunk_size!r}"
        )


def resolve_chunk_size(
    model: nn.Module,
    chunk_size: int | str | None,
    length: int | None = None,
    *,
    ignore_without_cache: bool = False,
) -> int | None:
    """The chunk length to feed ``model`` with: ``"auto"`` asks the model
    (:meth:`fidelity.models.base.CausalLM.auto_chunk_size`; other models: None, one call),
    None is one call, an int is checked (positive, and only for our models, whose recurrent
    cache carries the state between chunks; ``ignore_without_cache=True`` returns None for
    other models instead of refusing)."""
    check_chunk_size(chunk_size)
    if chunk_size == "auto":
        return model.auto_chunk_size(length) if isinstance(model, CausalLM) else None
    if chunk_size is None:
        return None
    if not isinstance(model, CausalLM):
        if ignore_without_cache:
            return None
        raise InputError(
            "chunk_size needs one of our models (a recurrent cache); use chunk_size=None"
        )
    return int(chunk_size)


def is_causal(model: nn.Module) -> bool:
    """Whether position ``t``'s outputs depend on tokens ``<= t`` only (every model but one
    whose :attr:`~fidelity.models.base.CausalLM.causal` says otherwise)."""
    return not isinstance(model, CausalLM) or model.causal


def returns_all_positions(model: nn.Module) -> bool:
    """Whether a forward returns logits at every input position (DeciMamba returns the
    positions it kept, with their ``positions``)."""
    return not isinstance(model, CausalLM) or model.all_positions
