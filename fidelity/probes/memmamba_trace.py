"""Observe MemMamba's memory from outside: note writes, pool contents, attention firing.

Forward hooks on each block's ``note_block``, ``trigger``, ``cross_token`` and
``cross_layer`` record, per block (0-based, as ``model.layers[i]``):

- which positions wrote a note, with their importance (all of them: writes are sparse);
- where cross-token attention fired (the previous position's state importance > ``tau2``);
- the attention weights over the notes of the pool, at the query positions you ask for.

:meth:`MemMambaTrace.pool_at` rebuilds the pool any position saw from the recorded writes with
the model's own eviction rule, so pool contents over time need no extra memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from fidelity.models.memmamba import MemMambaLM, Notes, PoolAttentionOutput, PoolView
from fidelity.models.state_pool import rank_order


@dataclass
class AttentionRecord:
    """One query's attention over its pool notes in block ``block``: ``kind`` is ``"token"``
    (the block's own pool) or ``"layer"`` (cross-layer attention over the pools of earlier
    blocks); ``note_positions`` / ``note_blocks`` `(n_notes,)` name the attended notes;
    ``weights`` `(n_heads, n_notes)`; ``fired`` says whether the output was used (cross-token
    attention only counts where it fired)."""

    block: int
    kind: str
    row: int
    query_position: int
    note_positions: torch.Tensor
    note_blocks: torch.Tensor
    weights: torch.Tensor
    fired: bool


@dataclass
class _BlockLog:
    """One block's records over the traced batch: ``written``, ``fired`` `(batch, length)`
    bool and ``importance`` `(batch, length)` float32 (every position's token importance),
    allocated before the forward pass and filled chunk by chunk, so that the hooks leave no
    allocation behind between chunks (small records kept chunk after chunk pinned the C heap
    under the next chunk's large temporaries: a 200k analysis grew by about 1 KB per token)."""

    written: torch.Tensor
    importance: torch.Tensor
    fired: torch.Tensor
    note_offset: int = 0
    trigger_offset: int = 0
    previous_score: list[float] | None = None

    @classmethod
    def allocate(cls, batch: int, length: int) -> _BlockLog:
        return cls(
            torch.zeros(batch, length, dtype=torch.bool),
            torch.zeros(batch, length, dtype=torch.float32),
            torch.zeros(batch, length, dtype=torch.bool),
        )


@dataclass
class MemMambaTrace:
    """What the hooks saw. Per block (0-based): ``writes(block)`` and ``fired(block)``;
    ``attention``: records at the requested query positions."""

    pool_size: int
    policy: str
    tau2: float
    logs: dict[int, _BlockLog]
    attention: list[AttentionRecord] = field(default_factory=list)

    def writes(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, positions, importance)``, each `(n_writes,)`, of the notes ``block`` wrote
        (``rows``: the batch rows), by row, then position."""
        log = self.logs[block]
        rows, positions = log.written.nonzero(as_tuple=True)
        return rows, positions, log.importance[rows, positions]

    def fired(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, positions)`` `(n,)` where ``block``'s cross-token attention fired."""
        rows, positions = self.logs[block].fired.nonzero(as_tuple=True)
        return rows, positions

    def write_rate(self, block: int, length: int, batch: int = 1) -> float:
        """Fraction of positions that wrote a note in ``block``."""
        return len(self.writes(block)[1]) / (length * batch)

    def pool_at(self, block: int, position: int, row: int = 0) -> torch.Tensor:
        """Sorted positions of the notes in ``block``'s pool as seen by a query at
        ``position`` (notes written before it) in batch row ``row``, rebuilt with the model's
        eviction rule."""
        ranked, member = self.pools_at(block, torch.tensor([position]), row)
        return ranked[member[0]].sort().values

    def pools_at(
        self, block: int, positions: torch.Tensor, row: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools of ``block`` seen by queries at ``positions`` `(m,)` in batch row ``row``,
        all at once: ``(ranked, member)``, where ``ranked`` `(n_writes,)` holds the row's note
        positions best-first and ``member`` `(m, n_writes)` bool marks the notes in each query's
        pool (:meth:`pool_at` of one position).

        The eviction rule ranks notes by a total order (fifo: newest first; priority: most
        important, then newest), so the pool at any position is the first ``pool_size`` notes
        of the one global ranking that were written before it: one sort for every query."""
        rows, written, importance = self.writes(block)
        chosen = rows == row
        written, importance = written[chosen], importance[chosen]
        valid = torch.ones_like(written, dtype=torch.bool)
        ranked = written[rank_order(importance[None], written[None], valid[None], self.policy)[0]]
        before = ranked[None, :] < torch.as_tensor(positions, dtype=torch.long)[:, None]
        return ranked, before & (before.cumsum(dim=1) <= self.pool_size)


@contextlib.contextmanager
def tracing_memmamba(
    model: MemMambaLM,
    shape: tuple[int, int],
    attention_positions: Sequence[int] | torch.Tensor = (),
) -> Iterator[MemMambaTrace]:
    """Record MemMamba's memory while ``model`` runs forward over one batch of sequences of
    ``shape`` `(batch, length)` (in one pass or consecutive chunks; ``step()`` is not
    observed). Attention weights are kept for ``attention_positions`` only."""
    if not isinstance(model, MemMambaLM):
        raise TypeError(f"tracing_memmamba needs a MemMambaLM, got {type(model).__name__}")
    config = model.config
    wanted = set(torch.as_tensor(attention_positions, dtype=torch.long).flatten().tolist())
    batch, length = shape
    trace = MemMambaTrace(config.pool_size, config.pool_policy, config.tau2, {})
    handles = []
    try:
        for index, block in enumerate(model.layers):
            log = trace.logs.setdefault(index, _BlockLog.allocate(batch, length))
            handles.append(block.note_block.register_forward_hook(_note_hook(log)))
            if block.trigger is not None:
                handles.append(block.trigger.register_forward_hook(_trigger_hook(log, config.tau2)))
                handles.append(
                    block.cross_token.register_forward_hook(
                        _attention_hook(trace, index, "token", wanted)
                    )
                )
            if block.cross_layer is not None:
                handles.append(
                    block.cross_layer.register_forward_hook(
                        _attention_hook(trace, index, "layer", wanted)
                    )
                )
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def _note_hook(log: _BlockLog):
    def hook(_module, _args, notes: Notes) -> None:
        start, end = _advance(log, "note_offset", notes.written.shape[1])
        log.written[:, start:end] = notes.written.detach().cpu()
        log.importance[:, start:end] = notes.importance.detach().float().cpu()

    return hook


def _trigger_hook(log: _BlockLog, tau2: float):
    def hook(_module, _args, scores: torch.Tensor) -> None:
        scores = scores.detach().float().cpu()  # (batch, length): I_state of each position
        previous = torch.tensor(log.previous_score or [0.0] * scores.shape[0])  # (batch,)
        shifted = torch.cat([previous[:, None], scores[:, :-1]], dim=1)
        start, end = _advance(log, "trigger_offset", scores.shape[1])
        log.fired[:, start:end] = shifted > tau2
        log.previous_score = scores[:, -1].tolist()

    return hook


def _advance(log: _BlockLog, offset: str, n: int) -> tuple[int, int]:
    """The positions ``[start, end)`` of the next ``n`` tokens; ValueError past the traced
    length."""
    start = getattr(log, offset)
    if start + n > log.written.shape[1]:
        raise ValueError(
            f"tracing_memmamba was set up for {log.written.shape[1]} tokens per sequence; the "
            f"model ran over {start + n}"
        )
    setattr(log, offset, start + n)
    return start, start + n


def _attention_hook(trace: MemMambaTrace, block: int, kind: str, wanted: set[int]):
    def hook(_module, args, output: PoolAttentionOutput) -> None:
        view: PoolView = args[1]
        queries = view.query_positions.tolist()  # (n_segments, n_queries)
        chosen = [
            (segment, index, position)
            for segment, positions in enumerate(queries)
            for index, position in enumerate(positions)
            if position in wanted
        ]
        if not chosen:
            return
        fired = _fired_lookup(trace, block) if kind == "token" else None
        for segment, query_index, position in chosen:
            for row in range(view.values.shape[0]):
                members = view.member[row, segment, query_index]
                weights = output.weights[row, segment, :, query_index, members]
                trace.attention.append(
                    AttentionRecord(
                        block=block,
                        kind=kind,
                        row=row,
                        query_position=position,
                        note_positions=view.positions[row, segment, members].cpu(),
                        note_blocks=view.blocks[row, segment, members].cpu(),
                        weights=weights.detach().cpu(),
                        fired=True if fired is None else (row, position) in fired,
                    )
                )

    return hook


def _fired_lookup(trace: MemMambaTrace, block: int) -> set[tuple[int, int]]:
    rows, positions = trace.fired(block)
    return set(zip(rows.tolist(), positions.tolist(), strict=True))
