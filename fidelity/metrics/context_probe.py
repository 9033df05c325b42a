"""Context-length probing (Cifka and Liutkus 2023, arXiv 2212.14815): a target token's loss as
a function of how many tokens of context the model is given.

For a target position ``T`` and a context length ``c``, the model is run on the ``c`` tokens
``x_{T-c+1} .. x_T`` alone and scored on the next token:

    NLL_c(T) = -log q(x_{T+1} | x_{T-c+1} .. x_T)

``context_probe(c)`` is its mean over the sampled targets (nats). The difference between
successive context lengths ``c' < c`` attributes the prediction to the context tokens between
them:

    context_probe_gain(c) = mean over targets of NLL_{c'}(T) - NLL_c(T)

(positive: the tokens ``c' + 1 .. c`` back helped; the gains telescope to ``NLL_1 - NLL_c``).
A model that uses long context has a curve that keeps falling with ``c``; a unigram model's is
flat (every gain 0).

Sampling. Context lengths on a log grid ``1, 2, 4, ...`` (``per_octave`` per doubling) up to
``max_context`` (default: the largest grid point <= ``L / 2`` for an input of ``L`` tokens);
``n_targets`` target positions drawn without replacement (seeded) from ``[max_context - 1,
L - 2]``, so every target has every context length and a next token. The same targets are
used at every ``c``, so the gains are paired differences.

Cost. For each ``c`` the ``n_targets * batch`` rows of ``c`` tokens are fed in groups of
rows holding no more tokens per call than the analysis's own forward (its chunk length, or the
input length when it runs in one call), so memory stays within the plan's estimate; a row longer
than the chunk runs through our models' recurrent cache chunk by chunk. In tokens per sequence

    n_targets * sum over the grid of c  ~  2 * n_targets * max_context  <=  n_targets * L

sub-quadratic in ``L`` (no position ever sees more than ``max_context`` tokens).
:func:`context_probe_tokens` gives the count the analysis plan prints.

Rows: ``metric`` ``context_probe`` and ``context_probe_gain`` (the latter from the second grid
point on), ``layer = source_layer = -1``, ``distance = c``, ``length`` the input length,
``value`` the mean over targets (each target first averaged over the batch), ``ci_low`` /
``ci_high`` a percentile bootstrap over targets, ``n`` the number of (sequence, target)
samples. Targets for which the model returned no logits (DeciMamba, when decimation drops
them) are absent samples.
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
from fidelity.metrics.sampling import seeded_generator
from fidelity.metrics.toolkit import resolve_chunk_size, tidy_frame
from fidelity.schema import TIDY_COLUMNS

METRIC = "context_probe"
GAIN_METRIC = "context_probe_gain"
FRAME_COLUMNS = (*TIDY_COLUMNS, "length", "depth")
DEFAULT_TARGETS = 8
_TARGET_STREAM = 17  # key of seeded_generator for the target draw


def probe_contexts(length: int, max_context: int | None = None, per_octave: int = 1) -> list[int]:
    """Context lengths for an input of ``length`` tokens: the log grid up to ``max_context``
    (default ``length // 2``)."""
    upper = length // 2 if max_context is None else max_context
    return log_grid(upper, per_octave)


def context_probe_tokens(
    length: int,
    *,
    n_targets: int = DEFAULT_TARGETS,
    max_context: int | None = None,
    per_octave: int = 1,
) -> int:
    """Tokens per sequence :func:`context_probe` runs on an input of ``length`` tokens."""
    contexts = probe_contexts(length, max_context, per_octave)
    if not contexts:
        return 0
    available = length - contexts[-1]
    return min(n_targets, max(available, 0)) * sum(contexts)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def probe_targets(length: int, largest: int, n_targets: int, seed: int) -> torch.Tensor:
    """The target positions `(k,)`, ascending: ``n_targets`` (fewer when fewer exist) drawn
    with ``seed`` from ``[largest - 1, length - 2]`` (``largest``: the longest context)."""
    candidates = torch.arange(largest - 1, length - 1)
    order = torch.randperm(len(candidates), generator=seeded_generator(seed, _TARGET_STREAM))
    return candidates[order[:n_targets]].sort().values


def context_probe(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    n_targets: int = DEFAULT_TARGETS,
    contexts: Sequence[int] | None = None,
    max_context: int | None = None,
    per_octave: int = 1,
    chunk_size: int | str | None = "auto",
    seed: int = 0,
    n_boot: int = 200,
    level: float = DEFAULT_LEVEL,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Context-length probing of ``model`` on ``input_ids`` `(batch, L)` as a tidy frame
    (columns :data:`FRAME_COLUMNS`; see the module docstring for sampling, cost and rows).

    ``contexts``: explicit context lengths (ascending after deduplication; default the log grid
    up to ``max_context``). ``chunk_size``: "auto", None or an int (our models).
    ``progress(done, total)`` is called after each context length, in tokens per sequence.
    """
    _check_count("n_targets", n_targets)
    _check_count("per_octave", per_octave)
    length = input_ids.shape[1]
    if contexts is None:
        grid = probe_contexts(length, max_context, per_octave)
    else:
        grid = sorted({_check_count("context length", int(c)) for c in contexts})
    if not grid or grid[-1] > length - 1:
        raise InputError(
            f"context lengths must lie in [1, {length - 1}] for an input of {length} tokens; "
            f"got {grid or 'none'}"
        )
    ids = input_ids.long().cpu()
    batch = ids.shape[0]
    targets = probe_targets(length, grid[-1], n_targets, seed)  # (k,)
    chunk = resolve_chunk_size(model, chunk_size, length, ignore_without_cache=True)
    budget = chunk or length  # tokens per call: no more than the analysis's own forward feeds
    labels = ids[:, targets + 1].reshape(-1)  # (batch * k,)
    total, done = len(targets) * sum(grid), 0
    nll = torch.empty(len(grid), batch, len(targets), dtype=torch.float64)
    for i, c in enumerate(grid):
        offsets = torch.arange(-c + 1, 1)  # (c,)
        windows = ids[:, targets[:, None] + offsets].reshape(batch * len(targets), c)
        per_call = max(1, budget // c)  # rows fed together
        log_probs = torch.cat(
            [
                log_probs_at(model, windows[first : first + per_call], torch.tensor([c - 1]), chunk)
                for first in range(0, len(windows), per_call)
            ]
        )[:, 0]
        nll[i] = -log_probs.gather(1, labels[:, None])[:, 0].reshape(batch, len(targets))
        done += len(targets) * c
        if progress is not None:
            progress(done, total)
    per_target = nll.nanmean(dim=1).numpy()  # (n_contexts, k)
    rows = []
    for i, c in enumerate(grid):
        value, low, high, _ = interval_row(per_target[i], n_boot, [seed, c], level)
        n = int(torch.isfinite(nll[i]).sum())
        rows.append((METRIC, -1, c, value, low, high, n, -1, length, np.nan))
        if i:
            gain = per_target[i - 1] - per_target[i]
            value, low, high, _ = interval_row(gain, n_boot, [seed, c, 1], level)
            n = int((torch.isfinite(nll[i]) & torch.isfinite(nll[i - 1])).sum())
            rows.append((GAIN_METRIC, -1, c, value, low, high, n, -1, length, np.nan))
    return tidy_frame(rows, columns=FRAME_COLUMNS)
