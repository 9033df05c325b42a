"""Loss by position: the per-token loss as a function of the token's position in one long
sequence, the standard length-generalization figure (flat past the training length for a
model that generalizes, rising where it does not).

    loss(p) = -log q(x_p | x_0 .. x_{p-1}),   p = 1 .. L - 1

read from the logits of the forward pass the analysis already makes: :func:`observe_position_loss`
puts a forward hook on the model around that pass (chunked or not; the last logits of a chunk
score the next chunk's first token), so the metric costs one log-softmax per position and a
``(batch, L)`` float64 buffer, no forward pass of its own.

Rows: positions are binned on a log axis (``per_octave`` bins per doubling; bin edges
``round(2 ** (k / per_octave))``, the last bin ending at ``L``). ``metric = "position_loss"``
(nats per token), ``layer = source_layer = -1``, ``distance`` = the bin's first position (the
bin runs to the next row's ``distance``, the last to ``length``), ``value`` the mean loss of
the bin's tokens over the batch, ``n`` the number of (sequence, token) losses. The interval is a
percentile bootstrap over contiguous blocks of the bin in each sequence (up to :data:`BLOCKS`
per bin and sequence): neighbouring tokens' losses are correlated, blocks less so; a bin of
one position in one sequence has no interval. Positions
for which the model returned no logits (DeciMamba once decimation drops rows) have no loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from fidelity.metrics.curves import DEFAULT_LEVEL
from fidelity.metrics.cut_context import interval_row, log_grid, output_logits
from fidelity.metrics.toolkit import returns_all_positions, tidy_frame

METRIC = "position_loss"
BLOCKS = 16
"""Contiguous blocks per bin that the interval resamples."""
DEFAULT_PER_OCTAVE = 4
_SLICE = 1024  # positions whose float64 log-softmax is taken at a time


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token losses `(batch, m)` float64 on the CPU of ``logits`` `(batch, m, vocab)`
    against ``targets`` `(batch, m)`."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs.gather(2, targets.to(logits.device)[..., None])[..., 0].cpu()


class PositionLossCollector:
    """Per-position next-token losses of one sequence batch, filled call by call.

    ``losses`` `(batch, length)` float64: ``losses[b, p]`` the loss of token ``p`` (NaN at
    ``p = 0``, which nothing predicts, and where the model returned no logits).
    """

    def __init__(self, length: int, batch: int | None = None) -> None:
        self.length = length
        self.losses: torch.Tensor | None = None  # allocated now when ``batch`` is given
        if batch is not None:
            self.losses = torch.full((batch, length), torch.nan, dtype=torch.float64)
        self.consumed = 0
        self._pending: torch.Tensor | None = None  # (batch, vocab): the last position's logits

    def record(self, model: nn.Module, ids: torch.Tensor, output: object) -> None:
        """One forward call over ``ids`` `(batch, n)` (positions ``consumed ..``)."""
        ids = ids.long().cpu()
        batch, n = ids.shape
        if self.losses is None:
            self.losses = torch.full((batch, self.length), torch.nan, dtype=torch.float64)
        start = self.consumed
        self.consumed += n
        logits = output_logits(output).detach()
        if returns_all_positions(model):
            if self._pending is not None:
                self.losses[:, start] = _nll(self._pending[:, None], ids[:, :1])[:, 0]
            for lo in range(0, n - 1, _SLICE):
                hi = min(lo + _SLICE, n - 1)
                self.losses[:, start + 1 + lo : start + 1 + hi] = _nll(
                    logits[:, lo:hi], ids[:, lo + 1 : hi + 1]
                )
            self._pending = logits[:, -1].clone()
            return
        self._pending = None  # rows were dropped: score only predictions inside this call
        positions = output.positions.cpu() - start  # (batch, n_out), ascending per row
        for row in range(batch):
            kept = positions[row] < n - 1
            at = positions[row][kept]
            picked = _nll(logits[row : row + 1, kept.to(logits.device)], ids[row : row + 1, at + 1])
            self.losses[row, start + 1 + at] = picked[0]

    def frame(
        self, per_octave: int = DEFAULT_PER_OCTAVE, n_boot: int = 200, seed: int = 0
    ) -> pd.DataFrame:
        """The binned rows (see the module docstring)."""
        if self.losses is None or self.consumed != self.length:
            raise RuntimeError(
                f"position_loss saw {self.consumed} of {self.length} tokens; the forward pass "
                "did not run through the model's forward"
            )
        return position_loss_frame(self.losses, per_octave=per_octave, n_boot=n_boot, seed=seed)


def position_bins(length: int, per_octave: int = DEFAULT_PER_OCTAVE) -> list[tuple[int, int]]:
    """Bins ``[start, stop)`` covering positions ``1 .. length - 1`` on a log axis."""
    starts = log_grid(length - 1, per_octave)
    return list(zip(starts, [*starts[1:], length], strict=True))


def position_loss_frame(
    losses: torch.Tensor,
    *,
    per_octave: int = DEFAULT_PER_OCTAVE,
    n_boot: int = 200,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """Binned loss-by-position rows from ``losses`` `(batch, length)` (NaN: no loss)."""
    missing = int(losses[:, 1:].isnan().sum())
    skipped = None
    if missing:
        skipped = (
            f"position_loss: {missing} of {losses[:, 1:].numel()} token losses are missing (the "
            "model returned no logits before them, e.g. DeciMamba's decimation); each bin "
            "averages the tokens scored (see its n)"
        )
    rows = []
    for start, stop in position_bins(losses.shape[1], per_octave):
        part = losses[:, start:stop]  # (batch, width)
        present = torch.isfinite(part)
        n = int(present.sum())
        if n == 0:
            continue
        blocks = np.array_split(np.arange(stop - start), min(BLOCKS, stop - start))
        block_means = torch.stack([part[:, torch.as_tensor(b)].nanmean(dim=1) for b in blocks])
        block_means = block_means.flatten().numpy()  # (n_blocks * batch,)
        _, low, high, _ = interval_row(block_means, n_boot, [seed, start], level)
        value = float(part[present].mean())
        rows.append((METRIC, -1, start, value, low, high, n, -1))
    return tidy_frame(rows, skipped=skipped)


def _call_ids(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("input_ids"), torch.Tensor):
        return kwargs["input_ids"]
    raise TypeError("position_loss cannot find the input ids of the model's forward call")


@contextlib.contextmanager
def observe_position_loss(
    model: nn.Module, length: int, batch: int | None = None
) -> Iterator[PositionLossCollector]:
    """A forward hook on ``model`` that scores every position of the forward pass(es) run
    inside the block, for one sequence batch of ``length`` tokens (and ``batch`` rows: its
    losses are then allocated before the forward pass); yields the collector."""
    collector = PositionLossCollector(length, batch)
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: collector.record(
            module, _call_ids(args, kwargs), output
        ),
        with_kwargs=True,
    )
    try:
        yield collector
    finally:
        handle.remove()
