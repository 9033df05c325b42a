"""MemMamba's memory at work: per block, how often it writes notes, how often cross-token
attention fires, how old the pool's notes are, and how much the memory path moves the output.

Everything per block comes from the analysis's own forward pass, observed with
:func:`~fidelity.probes.memmamba_trace.tracing_memmamba` (chunked or not); the output effect
costs one more forward over the first :data:`ZEROED_TOKENS` tokens with every pool context
zeroed (:func:`~fidelity.probes.memmamba_ablation.zeroed_memory_contexts`).

Rows (``B`` sequences of ``L`` tokens; block ``b`` is reported at ``layer = source_layer =
b + 1``, the residual stream it writes, ``distance = 0``; only blocks whose layer the run
keeps):

- ``memmamba_write_rate``: the fraction of the ``B x L`` positions at which the block writes a
  note (token importance above ``tau1``).
- ``memmamba_fire_rate``: the fraction of the ``B x L`` positions at which the block's
  cross-token attention fires (the previous position's state importance above ``tau2``;
  position 0 never fires). No row for a block without cross-token attention; cross-layer
  attention has no gate (it reads at every position).
- Pool note age, at the run's anchors (positions drawn uniformly, the ones ETMF starts from):
  a query at anchor ``a`` attends over the notes in its block's pool written at positions
  ``s < a`` (rebuilt from the recorded writes with the model's eviction rule); a note's age is
  ``a - s`` tokens. ``memmamba_note_age``: the mean over anchors of the mean age of the pool's
  notes; ``memmamba_note_age_oldest``: the mean over anchors of the oldest note's age (how far
  back the pool reaches); ``memmamba_note_age_median``: the median age over every (anchor,
  note) pair (no interval); ``n`` counts the anchors (pairs) with a non-empty pool.
  ``memmamba_pool_fill``: the mean number of notes in the pool at the anchors (0 to
  ``pool_size``, every anchor counted).
- ``memmamba_context_share``: how far the block's memory path moves the residual stream: the
  mean over the ``B x L`` positions of ``||c_t|| / ||h_t||``, ``c_t`` the fused memory contexts
  the block adds (cross-token and cross-layer, after fusion: block output minus ``h_t``) and
  ``h_t = x_t + mixer(norm(x_t))`` the stream they are added to (0: the path adds nothing).
- ``memmamba_loss_full``, ``memmamba_loss_zeroed``, ``memmamba_loss_delta`` (``layer =
  source_layer = -1``; ``length`` = ``P = min(L, ZEROED_TOKENS)``, the tokens they cover): the
  mean next-token loss (nats) of positions ``1 .. P - 1`` of every sequence, from the
  analysis's pass and from the zeroed pass (same chunks), and their difference zeroed - full
  (positive: the memory path lowers the loss). ``n``: the token losses averaged.

Intervals: percentile bootstraps over contiguous blocks of :data:`BLOCK_TOKENS` positions per
sequence for the rates, the context share and the losses (neighbouring positions are
correlated; the delta's blocks are paired), over anchors for the ages. Models other than
MemMamba have no rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from fidelity.metrics.curves import DEFAULT_LEVEL
from fidelity.metrics.cut_context import interval_row, model_device
from fidelity.metrics.position_loss import PositionLossCollector, observe_position_loss
from fidelity.metrics.toolkit import tidy_frame
from fidelity.models.base import LMOutput, ModelCache
from fidelity.models.memmamba import MemMambaLM
from fidelity.probes.memmamba_trace import MemMambaTrace, tracing_memmamba
from fidelity.schema import TIDY_COLUMNS

ZEROED_TOKENS = 8192
"""Tokens per sequence the zeroed-memory pass covers (the first ones): one extra forward of at
most this many tokens, so that a 60k analysis costs about 1.14 forwards, not 2."""
BLOCK_TOKENS = 128
"""Contiguous positions per block that the rate, context-share and loss intervals resample."""
AGE_BLOCK_ELEMENTS = 1 << 20
"""Most (anchor, note) pairs the note-age rows mask at once (~25 MB of masks, counts, ages)."""
WRITE_RATE = "memmamba_write_rate"
FIRE_RATE = "memmamba_fire_rate"
NOTE_AGE = "memmamba_note_age"
NOTE_AGE_OLDEST = "memmamba_note_age_oldest"
NOTE_AGE_MEDIAN = "memmamba_note_age_median"
POOL_FILL = "memmamba_pool_fill"
CONTEXT_SHARE = "memmamba_context_share"
LOSS_FULL = "memmamba_loss_full"
LOSS_ZEROED = "memmamba_loss_zeroed"
LOSS_DELTA = "memmamba_loss_delta"
METRICS = (
    WRITE_RATE,
    FIRE_RATE,
    NOTE_AGE,
    NOTE_AGE_OLDEST,
    NOTE_AGE_MEDIAN,
    POOL_FILL,
    CONTEXT_SHARE,
    LOSS_FULL,
    LOSS_ZEROED,
    LOSS_DELTA,
)
"""Every ``metric`` name this module writes."""
LOSS_COLUMNS = (*TIDY_COLUMNS, "length", "depth")


@dataclass
class MemoryObservation:
    """What the analysis's forward pass left: the pool ``trace``, the per-position ``losses``
    (:class:`~fidelity.metrics.position_loss.PositionLossCollector`) and, per block, the
    context share of every position ``shares[block]`` `(batch, length)` float32."""

    trace: MemMambaTrace
    losses: PositionLossCollector
    shares: dict[int, torch.Tensor]


def _share_hook(shares: dict[int, torch.Tensor], block: int):
    """A forward hook on a block's ``fusion`` writing ``||out - h|| / ||h||`` of each position
    of the call (fusion adds the memory contexts to ``h``; calls come in position order)."""
    consumed = [0]

    def hook(_module, args, out: torch.Tensor) -> None:
        h = args[0]  # (batch, n, d_model)
        share = (out - h).norm(dim=-1) / h.norm(dim=-1)  # (batch, n)
        start = consumed[0]
        shares[block][:, start : start + h.shape[1]] = share.detach().float().cpu()
        consumed[0] += h.shape[1]

    return hook


def zeroed_tokens(model: nn.Module | None, length: int) -> int:
    """Tokens per sequence the zeroed pass feeds ``model`` for an input of ``length`` (0 for a
    model that is not a MemMamba; None stands for any model)."""
    if model is not None and not isinstance(model, MemMambaLM):
        return 0
    return min(length, ZEROED_TOKENS)


@contextlib.contextmanager
def observe_memmamba_memory(
    model: nn.Module, shape: tuple[int, int]
) -> Iterator[MemoryObservation | None]:
    """Hooks around the analysis's forward pass over a batch of ``shape`` `(batch, length)`:
    yields a :class:`MemoryObservation` for a MemMamba, None (nothing observed) for any other
    model. Every record is allocated here, before the forward pass (see
    :class:`~fidelity.probes.memmamba_trace.MemMambaTrace`)."""
    if not isinstance(model, MemMambaLM):
        yield None
        return
    batch, length = shape
    shares = {index: torch.full((batch, length), torch.nan) for index in range(len(model.layers))}
    handles = []
    try:
        for index, block in enumerate(model.layers):
            handles.append(block.fusion.register_forward_hook(_share_hook(shares, index)))
        with (
            tracing_memmamba(model, shape) as trace,
            observe_position_loss(model, length, batch) as losses,
        ):
            yield MemoryObservation(trace, losses, shares)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def zeroed_losses(
    model: MemMambaLM,
    input_ids: torch.Tensor,
    chunk_size: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Next-token losses `(batch, n)` float64 (NaN at position 0) of ``input_ids`` `(batch, n)`
    with every pool context zeroed, fed in chunks of ``chunk_size`` through the recurrent cache
    (None: one pass), as the analysis feeds its input.

    With every context zeroed each block's output is its mixer's path, ``x + mixer(norm(x))``
    (:func:`~fidelity.probes.memmamba_ablation.zeroed_memory_contexts`: the fusion adds exactly
    zero), so only the embedding, the mixers, the final norm and the head run: the losses of
    the model run under ``zeroed_memory_contexts`` (tested), without the notes, pools and
    attentions that feed nothing (about a third of the pass)."""
    n = input_ids.shape[1]
    step = chunk_size or n
    cache = model.init_cache(input_ids.shape[0]) if step < n else None
    device = model_device(model)
    collector = PositionLossCollector(n)
    for start in range(0, n, step):
        ids = input_ids[:, start : start + step].to(device)
        collector.record(model, ids, LMOutput(logits=_mixer_path_logits(model, ids, cache)))
        if progress is not None:
            progress(min(start + step, n), n)
    return collector.losses


def _mixer_path_logits(
    model: MemMambaLM, ids: torch.Tensor, cache: ModelCache | None
) -> torch.Tensor:
    """Logits `(batch, n, vocab)` of ``ids`` `(batch, n)` through every block's mixer path only
    (advancing the mixers' states in ``cache``, when given)."""
    x = model.embedding(ids.long())
    for index, block in enumerate(model.layers):
        x = x + block.mixer(block.norm(x), cache.layers[index] if cache is not None else None)
    return model.lm_head(model.norm_f(x))[..., : model.config.vocab_size]


def _block_means(values: torch.Tensor) -> np.ndarray:
    """Means of contiguous blocks of :data:`BLOCK_TOKENS` positions of ``values`` `(batch, n)`
    (NaN ignored), every sequence's blocks together: `(batch * n_blocks,)`."""
    n = values.shape[1]
    sizes = [len(b) for b in np.array_split(np.arange(n), max(1, -(-n // BLOCK_TOKENS)))]
    starts = np.cumsum([0, *sizes[:-1]])
    array = values.double().numpy()
    finite = np.isfinite(array)
    sums = np.add.reduceat(np.where(finite, array, 0.0), starts, axis=1)  # (batch, n_blocks)
    counts = np.add.reduceat(finite, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    return means.T.flatten()


def _rate_row(
    metric: str,
    layer: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    shape: tuple[int, int],
    n_boot: int,
    seed: list[int],
    level: float,
) -> tuple:
    """One rate row: the fraction of the ``shape`` `(batch, length)` positions among the hits
    ``(rows, positions)`` `(n_hits,)`, with a block-bootstrap interval."""
    hits = torch.zeros(shape, dtype=torch.float64)
    hits[rows, positions] = 1.0
    _, low, high, _ = interval_row(_block_means(hits), n_boot, seed, level)
    return (metric, layer, 0, float(hits.mean()), low, high, hits.numel(), layer)


def _age_rows(
    trace: MemMambaTrace,
    block: int,
    anchors: torch.Tensor,
    batch: int,
    n_boot: int,
    seed: int,
    level: float,
) -> list[tuple]:
    """Note-age and pool-fill rows of ``block`` at ``anchors`` `(n_anchors,)` (module
    docstring)."""
    layer = block + 1
    means, oldest, fill, ages = [], [], [], []
    for row in range(batch):
        ranked, _ = trace.pools_at(block, anchors[:0], row)  # (n_writes,) best-first
        if len(ranked) == 0:
            means.append(torch.full((len(anchors),), torch.nan, dtype=torch.float64))
            oldest.append(means[-1])
            fill.append(torch.zeros(len(anchors), dtype=torch.float64))
            continue
        step = max(1, AGE_BLOCK_ELEMENTS // len(ranked))
        for first in range(0, len(anchors), step):  # (anchors x notes) masks in bounded blocks
            at = anchors[first : first + step].to(torch.long)  # (m,)
            _, member = trace.pools_at(block, at, row)  # (m, n_writes)
            age = (at[:, None] - ranked[None, :]).double()  # (m, n_writes)
            count = member.sum(dim=1)  # (m,)
            empty = count == 0
            total = torch.where(member, age, 0.0).sum(dim=1)
            means.append(torch.where(empty, torch.nan, total / count.clamp(min=1)))
            most = torch.where(member, age, -torch.inf).amax(dim=1)
            oldest.append(torch.where(empty, torch.nan, most))
            fill.append(count.double())
            ages.append(age[member])
    means, oldest, fill = (
        torch.cat(v).numpy() if v else np.empty(0) for v in (means, oldest, fill)
    )
    rows = []
    for index, (metric, samples) in enumerate(
        ((NOTE_AGE, means), (NOTE_AGE_OLDEST, oldest), (POOL_FILL, fill))
    ):
        value, low, high, n = interval_row(samples, n_boot, [seed, layer, 10 + index], level)
        rows.append((metric, layer, 0, value, low, high, n, layer))
    every = torch.cat(ages) if ages else torch.empty(0, dtype=torch.float64)
    median = float(every.median()) if len(every) else np.nan
    rows.append((NOTE_AGE_MEDIAN, layer, 0, median, np.nan, np.nan, len(every), layer))
    return rows


def _loss_rows(
    full: torch.Tensor, zeroed: torch.Tensor, n_boot: int, seed: int, level: float
) -> list[tuple]:
    """Loss rows from per-position losses `(batch, P)` of the full and the zeroed pass over the
    first ``P`` tokens (NaN where nothing was predicted: position 0)."""
    length = full.shape[1]
    present = torch.isfinite(full) & torch.isfinite(zeroed)
    full = full.masked_fill(~present, torch.nan)[:, 1:]
    zeroed = zeroed.masked_fill(~present, torch.nan)[:, 1:]
    present = present[:, 1:]
    rows = []
    for index, (metric, values) in enumerate(
        ((LOSS_FULL, full), (LOSS_ZEROED, zeroed), (LOSS_DELTA, zeroed - full))
    ):
        _, low, high, _ = interval_row(_block_means(values), n_boot, [seed, 20 + index], level)
        value = float(values[present].mean()) if present.any() else np.nan
        rows.append((metric, -1, 0, value, low, high, int(present.sum()), -1, length, np.nan))
    return rows


def memmamba_memory(
    model: MemMambaLM,
    input_ids: torch.Tensor,
    observation: MemoryObservation,
    anchors: torch.Tensor,
    layers: Sequence[int],
    *,
    chunk_size: int | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    progress: Callable[[int, int], None] | None = None,
) -> list[pd.DataFrame]:
    """The rows of the module docstring for ``model`` on ``input_ids`` `(batch, L)`, whose
    forward pass ``observation`` watched (:func:`observe_memmamba_memory`); ``anchors``
    `(n_anchors,)` positions for the note ages; ``layers``: the residual layers to report
    (block ``b`` is layer ``b + 1``); ``chunk_size`` as the analysis fed the input. Returns
    [per-block rows (:data:`~fidelity.schema.TIDY_COLUMNS`), loss rows (:data:`LOSS_COLUMNS`)].
    """
    if not isinstance(model, MemMambaLM):
        raise TypeError(f"memmamba_memory needs a MemMambaLM, got {type(model).__name__}")
    batch, length = input_ids.shape
    trace = observation.trace
    rows = []
    for block in range(model.config.n_layer):
        layer = block + 1
        if layer not in layers:
            continue
        written_rows, written_positions, _ = trace.writes(block)
        rows.append(
            _rate_row(
                WRITE_RATE,
                layer,
                written_rows,
                written_positions,
                (batch, length),
                n_boot,
                [seed, layer, 0],
                level,
            )
        )
        if model.layers[block].cross_token is not None:
            fired_rows, fired_positions = trace.fired(block)
            rows.append(
                _rate_row(
                    FIRE_RATE,
                    layer,
                    fired_rows,
                    fired_positions,
                    (batch, length),
                    n_boot,
                    [seed, layer, 1],
                    level,
                )
            )
        rows.extend(_age_rows(trace, block, anchors, batch, n_boot, seed, level))
        share = observation.shares[block]
        _, low, high, _ = interval_row(_block_means(share), n_boot, [seed, layer, 2], level)
        mean = float(share.double().nanmean())
        rows.append((CONTEXT_SHARE, layer, 0, mean, low, high, int(share.isfinite().sum()), layer))
    prefix = zeroed_tokens(model, length)
    zeroed = zeroed_losses(model, input_ids[:, :prefix], chunk_size, progress)
    full = observation.losses.losses[:, :prefix]
    losses = _loss_rows(full, zeroed, n_boot, seed, level)
    return [tidy_frame(rows), tidy_frame(losses, columns=LOSS_COLUMNS)]
