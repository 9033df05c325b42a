"""Effective remembrance (Buitrago Ruiz and Gu 2025, arXiv 2507.02782): how much a model's
prediction at position ``T`` still depends on the start of its context.

    EffRem_T(t) = TV(q(. | x_0 .. x_T), q(. | x_t .. x_T))

the total-variation distance (half the L1 distance, in [0, 1]) between the next-token
distribution at ``T`` given the whole prefix and given the context cut to start at ``t`` (the
first ``t`` tokens dropped). 0 means the dropped tokens do not matter to the prediction at
all; a model that generalizes in length has small values for small ``t`` (it relies little on
the distant start) and rises as the cut approaches ``T``.

Sampling. Ends ``T`` on a log grid (``L - 1``, ``L/2 - 1``, ``L/4 - 1``, ... for an input of
``L`` tokens; ``n_ends`` of them), each with a ``window`` of consecutive targets
``T - window + 1 .. T`` whose values are averaged (the samples of the interval; neighbouring
targets are correlated, so the interval is optimistic). Cuts ``t`` on a log grid from both
sides of the window's first target ``T0``: ``t = 1, 4, 16, ...`` from the distant start
(``start_per_octave`` per doubling, default every other one) and ``t = T0 + 1 - 1, 2, 4, ...``
near the targets (``per_octave`` per doubling).

Cost. One pass over ``x_0 .. x_{T_max}`` for the full-context distributions, then one pass per
distinct cut ``t`` over ``x_t .. x_{T(t)}``, where ``T(t)`` is the largest end using that cut
(a recurrent model's single pass from ``t`` gives the cut distribution at every later target,
so the start cuts are shared by all ends). In tokens per sequence:

    L + sum over distinct t of (T(t) - t + 1)  <  (4 + start_per_octave * log2 L) * L

(the full pass ``L``, ``1 + start_per_octave * log2 L`` start cuts of up to ``L`` tokens
each, the near cuts about ``2 L`` over all ends): sub-quadratic, about 9 forward passes' worth
at 8k and 11 at 60k. Our models are fed through their recurrent cache in chunks
(``chunk_size="auto"``), so memory stays that of one chunk; other models run each window in one
call. A model that is not causal (DeciMamba, whose decimation is a global choice over its
input) runs every end on its own windows ``x_0 .. x_T`` and ``x_t .. x_T``, so no later token
reaches a prediction. :func:`effrem_tokens` gives the count the analysis plan prints.

Rows: ``metric = "effrem"``, ``layer = source_layer = -1``, ``distance = t`` (tokens dropped),
``length = T + 1`` (the end's full context), ``value`` the mean TV over the window's targets
and the batch, ``ci_low``/``ci_high`` a percentile bootstrap over the targets, ``n`` the number
of (sequence, target) samples. Targets for which the model returned no logits (DeciMamba,
when decimation drops them) are absent samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.metrics.curves import DEFAULT_LEVEL
from fidelity.metrics.cut_context import interval_row, log_grid, log_probs_at
from fidelity.metrics.toolkit import is_causal, resolve_chunk_size, tidy_frame
from fidelity.schema import TIDY_COLUMNS

METRIC = "effrem"
FRAME_COLUMNS = (*TIDY_COLUMNS, "length", "depth")
DEFAULT_ENDS = 4
DEFAULT_WINDOW = 16
START_PER_OCTAVE = 0.5


def effrem_ends(length: int, n_ends: int = DEFAULT_ENDS, window: int = DEFAULT_WINDOW) -> list[int]:
    """The ends ``T`` for an input of ``length`` tokens: ``length // 2**k - 1`` for
    ``k < n_ends``, those with room for a window and at least one cut (``T >= 2 * window``)."""
    ends = {length // 2**k - 1 for k in range(n_ends)}
    return sorted(end for end in ends if end >= 2 * window)


def effrem_cuts(
    first_target: int, per_octave: float = 1, start_per_octave: float = START_PER_OCTAVE
) -> list[int]:
    """Cuts ``t`` for a window whose first target is ``first_target``: a log grid from the
    start (``1, 4, 16, ...`` with ``start_per_octave`` 0.5) and one back from the window
    (``first_target + 1 - 1, 2, 4, ...`` with ``per_octave`` 1), all in ``[1,
    first_target]``."""
    near = {first_target + 1 - c for c in log_grid(first_target, per_octave)}
    return sorted(set(log_grid(first_target, start_per_octave)) | near)


def effrem_pairs(
    ends: Sequence[int],
    window: int,
    per_octave: float = 1,
    start_per_octave: float = START_PER_OCTAVE,
) -> dict[int, list[int]]:
    """For each distinct cut ``t``, the ends it is measured at (ascending)."""
    pairs: dict[int, list[int]] = {}
    for end in ends:
        for cut in effrem_cuts(end - window + 1, per_octave, start_per_octave):
            pairs.setdefault(cut, []).append(end)
    return dict(sorted(pairs.items()))


def _schedule(
    ends: list[int], passes: dict[int, list[int]], causal: bool
) -> list[tuple[int, list[int]]]:
    """The passes to run, ``(cut, ends served)``, the full context (cut 0) first. A causal
    model's pass from ``t`` serves every end; a model that is not causal (DeciMamba: its
    decimation is a global choice over the whole window) runs each end on its own window."""
    schedule = [(0, list(ends)), *passes.items()]
    if causal:
        return schedule
    return [(cut, [end]) for cut, served in schedule for end in served]


def effrem_tokens(
    length: int,
    *,
    n_ends: int = DEFAULT_ENDS,
    window: int = DEFAULT_WINDOW,
    per_octave: float = 1,
    start_per_octave: float = START_PER_OCTAVE,
    causal: bool = True,
) -> int:
    """Tokens per sequence :func:`effrem` runs on an input of ``length`` tokens (see the
    module docstring's cost formula; ``causal=False``: each end on its own window, about
    ``n_ends``/2 times more at most)."""
    ends = effrem_ends(length, n_ends, window)
    if not ends:
        return 0
    passes = effrem_pairs(ends, window, per_octave, start_per_octave)
    return sum(max(served) + 1 - cut for cut, served in _schedule(ends, passes, causal))


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _total_variation(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum |p - q|`` over the last axis of log-probabilities `(..., vocab)`."""
    return 0.5 * (p_log.exp() - q_log.exp()).abs().sum(dim=-1)


def effrem(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    n_ends: int = DEFAULT_ENDS,
    window: int = DEFAULT_WINDOW,
    per_octave: float = 1,
    start_per_octave: float = START_PER_OCTAVE,
    chunk_size: int | str | None = "auto",
    seed: int = 0,
    n_boot: int = 200,
    level: float = DEFAULT_LEVEL,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Effective remembrance of ``model`` on ``input_ids`` `(batch, L)` as a tidy frame
    (columns :data:`FRAME_COLUMNS`; see the module docstring for the sampling, cost and rows).

    ``chunk_size``: "auto" (the model's own chunk length), None (one call per window) or an
    int (our models). ``progress(done, total)`` is called after each pass, in tokens.
    """
    _check_count("n_ends", n_ends)
    _check_count("window", window)
    for name, value in (("per_octave", per_octave), ("start_per_octave", start_per_octave)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InputError(f"{name} must be a positive number, got {value!r}")
    length = input_ids.shape[1]
    ends = effrem_ends(length, n_ends, window)
    if not ends:
        raise InputError(
            f"effrem needs at least {2 * window + 1} tokens for a window of {window} targets; "
            f"the input has {length}"
        )
    ids = input_ids.long().cpu()
    passes = effrem_pairs(ends, window, per_octave, start_per_octave)
    total = sum(max(served) + 1 - cut for cut, served in _schedule(ends, passes, is_causal(model)))
    targets = {end: torch.arange(end - window + 1, end + 1) for end in ends}
    chunk = resolve_chunk_size(model, chunk_size, max(ends) + 1, ignore_without_cache=True)
    full: dict[int, torch.Tensor] = {}  # end -> (batch, window, vocab): the cut 0 distributions
    tv: dict[tuple[int, int], torch.Tensor] = {}  # (end, cut) -> (batch, window)
    done = 0
    for cut, served in _schedule(ends, passes, is_causal(model)):
        wanted = torch.cat([targets[end] for end in served]).unique(sorted=True)
        log_probs = log_probs_at(model, ids[:, cut : max(served) + 1], wanted - cut, chunk)
        for end in served:
            at = log_probs[:, torch.searchsorted(wanted, targets[end])]  # (batch, window, vocab)
            if cut == 0:
                full[end] = at
            else:
                tv[end, cut] = _total_variation(full[end], at)
        done += max(served) + 1 - cut
        if progress is not None:
            progress(done, total)
    rows = []
    for (end, cut), values in sorted(tv.items()):
        per_target = values.nanmean(dim=0).numpy()  # (window,): mean over the batch
        value, low, high, _ = interval_row(per_target, n_boot, [seed, end, cut], level)
        n = int(torch.isfinite(values).sum())
        rows.append((METRIC, -1, cut, value, low, high, n, -1, end + 1, np.nan))
    return tidy_frame(rows, columns=FRAME_COLUMNS)
