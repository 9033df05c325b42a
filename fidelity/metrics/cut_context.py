"""What the output-level metrics share: next-token log-probabilities of a (cut) context at
chosen positions, a log-spaced grid, and a row's mean with its interval.

:func:`log_probs_at` runs a model over a token window and keeps the log-softmax at a few
positions only, feeding the window chunk by chunk through our models' recurrent cache when a
chunk length is given (the logits of a position do not depend on how the sequence before it was
chunked; tested against one pass), so memory grows with the chunk, never with the window. It is
what ``effrem`` and ``context_probe`` run the model with; ``position_loss`` reads the logits of
the analysis's own forward pass instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fidelity.metrics.curves import DEFAULT_LEVEL, bootstrap_counts, mean_with_interval
from fidelity.metrics.toolkit import returns_all_positions


def output_logits(output: object) -> torch.Tensor:
    """The logits `(batch, n, vocab)` of a model's output (a tensor or an object with
    ``logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def log_grid(upper: int, per_octave: float = 1) -> list[int]:
    """Integers ``round(2 ** (k / per_octave))`` from 1 up to ``upper`` (inclusive), unique
    and ascending (empty when ``upper < 1``); ``per_octave`` points per doubling (0.5: every
    other doubling)."""
    if upper < 1:
        return []
    steps = math.floor(math.log2(upper) * per_octave + 1e-9) + 1
    return sorted({min(upper, round(2 ** (k / per_octave))) for k in range(steps)})


def _rows_at(output: object, model: nn.Module, start: int, wanted: torch.Tensor) -> torch.Tensor:
    """Logits `(batch, k, vocab)` of ``output`` (a call over positions ``start ..``) at the
    absolute positions ``wanted`` `(k,)`; NaN rows where the model returned no logits for a
    position (DeciMamba, once decimation drops it)."""
    logits = output_logits(output)
    if returns_all_positions(model):
        return logits[:, (wanted - start).to(logits.device)]
    positions = output.positions  # (batch, n_out), absolute, ascending per row
    batch, n_out, vocab = logits.shape
    target = wanted.to(positions.device).expand(batch, -1).contiguous()
    index = torch.searchsorted(positions.contiguous(), target).clamp(max=max(n_out - 1, 0))
    present = positions.gather(1, index) == target  # (batch, k)
    rows = logits.gather(1, index[..., None].expand(-1, -1, vocab)).clone()
    rows[~present] = torch.nan
    return rows


@torch.no_grad()
def log_probs_at(
    model: nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token log-probabilities of ``model`` run on ``ids`` `(batch, n)` alone (a fresh
    context starting at ``ids[:, 0]``), at ``positions`` `(k,)` (ascending, in ``[0, n)``).

    Returns `(batch, k, vocab)` float64 on the CPU, NaN rows for positions the model returned
    no logits for. ``chunk_size`` (our models, whose cache carries the state) feeds the window
    in chunks of that many tokens; None is one call.
    """
    device = model_device(model)
    batch, n = ids.shape
    step = chunk_size if chunk_size is not None and n > chunk_size else n
    cache = model.init_cache(batch) if step < n else None
    pieces = []
    for start in range(0, n, step):
        chunk = ids[:, start : start + step].to(device)
        output = model(chunk) if cache is None else model(chunk, cache=cache)
        lo, hi = torch.searchsorted(positions, torch.tensor([start, start + chunk.shape[1]]))
        if hi > lo:
            rows = _rows_at(output, model, start, positions[lo:hi])
            pieces.append(torch.log_softmax(rows.double(), dim=-1).cpu())
    return torch.cat(pieces, dim=1)


def interval_row(
    samples: np.ndarray, n_boot: int, seed: list[int], level: float = DEFAULT_LEVEL
) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` of per-sample values `(n,)` (NaN: absent), with a
    percentile bootstrap over the samples (no interval when ``n_boot`` is 0 or only one
    sample is present)."""
    present = samples[np.isfinite(samples)]
    if present.size == 0:
        return math.nan, math.nan, math.nan, 0
    counts = bootstrap_counts(present.size, n_boot, seed) if n_boot and present.size > 1 else None
    value, low, high = mean_with_interval(present, counts, level)
    return value, low, high, int(present.size)
