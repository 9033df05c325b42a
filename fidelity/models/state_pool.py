"""MemMamba's state-summary pool, explicit (one token at a time) and parallel (a whole chunk).

A pool holds at most ``size`` summaries ("notes") of earlier tokens. A note written at
position ``s`` is visible to queries at positions ``t > s`` only (strictly causal). When the
pool is full, a write evicts:

- ``"fifo"``: the oldest note;
- ``"priority"``: the least important note (importance at write time; ties: the older one). A
  new note less important than every note in a full pool is dropped.

Both rules keep, at every moment, the ``size`` best notes written so far under a total order
(``fifo``: position; ``priority``: (importance, position)), because an evicted note can never
become one of the best again. The parallel form uses exactly that: the pool seen by query ``t``
is the top-``size`` of the notes written before ``t``. Queries are processed in segments; a
segment's candidates are the pool at the segment start plus the notes written inside the segment
(compacted to the written ones, sorted best-first), and a boolean membership mask `(batch,
n_segments, segment_size, n_candidates)` says which candidates each query sees: the first
``size`` candidates written before it, found with one comparison and a running count along the
candidates per query and candidate (in 16-bit integers, positions counted from the segment
start). Candidates no query of their segment sees (empty pool slots, notes dropped or evicted
before any query saw them) are then dropped, so that attention over the candidates costs in
the notes some query sees. Only the merge of the pool with each segment's new notes runs
segment after segment; the rest is computed for all segments at once. Time and memory are
O(length * (size + segment)), never O(length^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POOL_POLICIES = ("fifo", "priority")


@dataclass
class StatePool:
    """An explicit pool: ``values`` `(batch, size, summary_dim)`, ``importance`` `(batch,
    size)`, ``positions`` `(batch, size)` (absolute token positions, -1 when empty) and
    ``valid`` `(batch, size)`."""

    values: torch.Tensor
    importance: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    policy: str

    @classmethod
    def empty(
        cls,
        batch_size: int,
        size: int,
        summary_dim: int,
        policy: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> StatePool:
        if policy not in POOL_POLICIES:
            raise ValueError(f"pool policy must be one of {POOL_POLICIES}, got {policy!r}")
        return cls(
            values=torch.zeros(batch_size, size, summary_dim, device=device, dtype=dtype),
            importance=torch.zeros(batch_size, size, device=device, dtype=dtype),
            positions=torch.full((batch_size, size), -1, device=device, dtype=torch.long),
            valid=torch.zeros(batch_size, size, device=device, dtype=torch.bool),
            policy=policy,
        )

    @property
    def size(self) -> int:
        return self.values.shape[1]

    def visible(self, position: int, inclusive: bool = False) -> torch.Tensor:
        """`(batch, size)` mask of the notes written before ``position`` (or at it, with
        ``inclusive``)."""
        if inclusive:
            return self.valid & (self.positions <= position)
        return self.valid & (self.positions < position)

    def write(
        self, value: torch.Tensor, importance: torch.Tensor, position: int, mask: torch.Tensor
    ) -> None:
        """Write one note per row where ``mask`` `(batch,)` is set: ``value`` `(batch,
        summary_dim)`, ``importance`` `(batch,)`, at token ``position``; evicts by the policy."""
        rows = torch.arange(self.values.shape[0], device=self.values.device)
        has_free = ~self.valid.all(dim=1)
        free_slot = (~self.valid).int().argmax(dim=1)
        worst_slot = self._worst_slot()
        worst_importance = self.importance[rows, worst_slot]
        if self.policy == "fifo":
            beats_worst = torch.ones_like(mask)
        else:  # the new note is the newest, so it wins ties on importance
            beats_worst = importance >= worst_importance
        slot = torch.where(has_free, free_slot, worst_slot)
        take = mask & (has_free | beats_worst)
        target = rows[take], slot[take]
        self.values[target] = value[take].to(self.values.dtype)
        self.importance[target] = importance[take].to(self.importance.dtype)
        self.positions[target] = position
        self.valid[target] = True

    def _worst_slot(self) -> torch.Tensor:
        """`(batch,)` slot of the note a full pool would evict."""
        if self.policy == "fifo":
            return self.positions.argmin(dim=1)
        order = rank_order(self.importance, self.positions, self.valid, self.policy)
        return order[:, -1]


def rank_order(
    importance: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, policy: str
) -> torch.Tensor:
    """Indices that sort notes best-first along the last dim (invalid notes last).

    ``importance``, ``positions``, ``valid`` `(batch, n)` -> `(batch, n)` long. Best means the
    newest for ``fifo`` and the most important (then newest) for ``priority``.
    """
    positions = positions.masked_fill(~valid, -1)
    order = torch.argsort(positions, dim=-1, descending=True, stable=True)
    if policy == "fifo":
        return order
    key = importance.masked_fill(~valid, float("-inf")).gather(-1, order)
    return order.gather(-1, torch.argsort(key, dim=-1, descending=True, stable=True))


@dataclass
class PoolSegments:
    """The pool as every query of a chunk sees it, for all query segments at once.

    The chunk's queries are cut into ``n_segments`` segments of ``segment_size`` positions (the last
    one padded); query ``j`` of segment ``i`` is at absolute position ``query_positions[i, j]``
    (-1 for padding past the chunk's end: it sees nothing). A segment's candidates `(batch,
    n_segments, n_candidates, ...)` are the pool at the segment start followed by the notes written
    inside the segment, sorted best-first (invalid candidates last); ``member`` `(batch, n_segments,
    segment_size, n_candidates)` marks the candidates in each query's pool (notes of earlier
    positions), ``member_inclusive`` (when computed) the pool just after the query position
    wrote its own note. ``positions`` is -1 for invalid candidates.
    """

    values: torch.Tensor
    importance: torch.Tensor
    positions: torch.Tensor
    member: torch.Tensor
    member_inclusive: torch.Tensor | None
    query_positions: torch.Tensor


def pool_segments(
    initial: StatePool,
    values: torch.Tensor,
    importance: torch.Tensor,
    written: torch.Tensor,
    start_position: int,
    segment_size: int,
    inclusive: bool = False,
) -> tuple[PoolSegments, StatePool]:
    """The pool seen by every position of a chunk, segment by segment, and the pool after it.

    ``initial`` is the pool before the chunk; ``values`` `(batch, length, summary_dim)`,
    ``importance`` `(batch, length)` and ``written`` `(batch, length)` describe the notes the
    chunk's tokens write; ``start_position`` is the absolute position of the chunk's first
    token; ``segment_size`` is the most queries per segment (the chunk is cut into as few
    segments as that allows, of equal sizes up to one, so that little padding is needed). With
    ``inclusive`` the segments also carry ``member_inclusive``. Gradients flow through
    ``values`` (and ``initial.values``) into the segments.

    Cost: one short loop over segments that merges the pool (``size`` notes) with the segment's
    new notes on (key, index) pairs only, O(size + new notes) per segment; everything else (the
    candidates' values, the membership masks) is computed for all segments at once.
    """
    batch, length = written.shape
    size = initial.size
    device = values.device
    n_segments = -(-length // segment_size)
    segment_size = -(-length // n_segments) if n_segments else segment_size  # balanced
    pad = n_segments * segment_size - length
    # Notes table: the initial pool (best-first) in rows 0 .. size - 1, the chunk's positions
    # (padded to whole segments) after it. Candidates are indices into this table.
    first = rank_order(initial.importance, initial.positions, initial.valid, initial.policy)
    table_values = torch.cat(
        [
            initial.values.gather(1, first[..., None].expand(-1, -1, initial.values.shape[-1])).to(
                values.dtype
            ),
            values,
            values.new_zeros(batch, pad, values.shape[-1]),
        ],
        dim=1,
    )
    importance = importance.detach()
    table_importance = torch.cat(
        [
            initial.importance.gather(1, first).to(importance.dtype),
            importance,
            importance.new_zeros(batch, pad),
        ],
        dim=1,
    )
    chunk_positions = torch.arange(start_position, start_position + length + pad, device=device)
    table_valid = torch.cat(
        [initial.valid.gather(1, first), written, written.new_zeros(batch, pad)], dim=1
    )
    table_positions = torch.cat(
        [initial.positions.gather(1, first), chunk_positions.expand(batch, -1)], dim=1
    ).masked_fill(~table_valid, -1)
    # The sort key, best first in descending order; invalid entries get the lowest key.
    if initial.policy == "fifo":
        table_key = table_positions
    else:
        table_key = table_importance.masked_fill(~table_valid, float("-inf"))

    # Each segment's written notes, compacted to the front, in best-first order (their
    # positions descend, so a stable sort on the key breaks ties towards the newer note).
    segment_written = table_valid[:, size:].view(batch, n_segments, segment_size)
    n_new = int(segment_written.sum(dim=2).max()) if length else 0
    newest_first = torch.arange(segment_size - 1, -1, -1, device=device)
    by_position = torch.argsort(
        (~segment_written[..., newest_first]).to(torch.int8), dim=2, stable=True
    )[..., :n_new]
    new_index = (
        size
        + segment_size
        - 1
        - by_position
        + torch.arange(n_segments, device=device)[:, None] * segment_size
    )  # (batch, n_segments, n_new) table rows
    new_key = table_key.gather(1, new_index.flatten(1)).view(batch, n_segments, n_new)
    best = torch.argsort(new_key, dim=2, descending=True, stable=True)
    new_index = new_index.gather(2, best)
    new_key = new_key.gather(2, best)

    # The pools at segment starts: merge the (best-first) pool with the segment's (best-first)
    # new notes; new notes go first so that the stable sort prefers them on equal keys (they
    # are newer than every pool note).
    pool_index = torch.arange(size, device=device).expand(batch, size)
    pool_key = table_key[:, :size]
    candidates = []
    for segment in range(n_segments):
        merged_index = torch.cat([new_index[:, segment], pool_index], dim=1)
        merged_key = torch.cat([new_key[:, segment], pool_key], dim=1)
        merged_key, order = torch.sort(merged_key, dim=1, descending=True, stable=True)
        merged_index = merged_index.gather(1, order)
        candidates.append(merged_index)
        pool_index = merged_index[:, :size]
        pool_key = merged_key[:, :size]
    index = torch.stack(candidates, dim=1)  # (batch, n_segments, n_candidates), best-first
    n_candidates = index.shape[2]
    flat = index.flatten(1)
    cand_values = table_values.gather(
        1, flat[..., None].expand(-1, -1, table_values.shape[-1])
    ).view(batch, n_segments, n_candidates, -1)
    cand_importance = table_importance.gather(1, flat).view(batch, n_segments, n_candidates)
    cand_positions = table_positions.gather(1, flat).view(batch, n_segments, n_candidates)
    cand_valid = table_valid.gather(1, flat).view(batch, n_segments, n_candidates)
    query_positions = chunk_positions.masked_fill(chunk_positions >= start_position + length, -1)
    query_positions = query_positions.view(n_segments, segment_size)  # padding queries: -1
    written_at, queries = _relative_positions(
        cand_positions, cand_valid, query_positions, start_position, segment_size
    )
    member = _first_written(written_at < queries, size)
    member_inclusive = _first_written(written_at <= queries, size) if inclusive else None
    segments = _drop_unseen(
        PoolSegments(
            cand_values, cand_importance, cand_positions, member, member_inclusive, query_positions
        )
    )
    last = pool_index
    final = StatePool(
        table_values.gather(1, last[..., None].expand(-1, -1, table_values.shape[-1])),
        table_importance.gather(1, last),
        table_positions.gather(1, last),
        table_valid.gather(1, last),
        initial.policy,
    )
    return segments, final


def _drop_unseen(segments: PoolSegments) -> PoolSegments:
    """``segments`` without the candidates no query of their segment sees (empty pool slots,
    notes dropped or evicted before any query saw them: at high write rates most of the
    notes written inside a segment), keeping at least one candidate per segment: each
    segment's seen candidates first, in their best-first order, the segments padded with
    unseen ones to the largest count. Every query's pool is unchanged, and attention over
    candidates costs in their number."""
    seen = segments.member.view(torch.uint8).amax(dim=2)  # (batch, n_segments, n_candidates)
    if segments.member_inclusive is not None:
        seen |= segments.member_inclusive.view(torch.uint8).amax(dim=2)
    n_candidates = seen.shape[-1]
    n_seen = max(1, int(seen.sum(-1, dtype=torch.int32).max())) if seen.numel() else 1
    if n_seen >= n_candidates:
        return segments
    keep = torch.argsort(1 - seen, dim=-1, stable=True)[..., :n_seen]  # (batch, n_segments, n)

    def queries_keep(member: torch.Tensor | None) -> torch.Tensor | None:
        if member is None:
            return None
        return member.gather(3, keep[:, :, None].expand(-1, -1, member.shape[2], -1))

    return PoolSegments(
        segments.values.gather(2, keep[..., None].expand(-1, -1, -1, segments.values.shape[-1])),
        segments.importance.gather(2, keep),
        segments.positions.gather(2, keep),
        queries_keep(segments.member),
        queries_keep(segments.member_inclusive),
        segments.query_positions,
    )


def _relative_positions(
    positions: torch.Tensor,
    valid: torch.Tensor,
    query_positions: torch.Tensor,
    start_position: int,
    segment_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate and query positions counted from their segment's start, in the smallest
    integer type that holds them, ordered as the absolute ones where it matters.

    ``positions``, ``valid`` `(batch, n_segments, n_candidates)`, ``query_positions``
    `(n_segments, segment_size)` (-1 for padding) -> (``written_at`` `(batch, n_segments, 1,
    n_candidates)`, ``queries`` `(1, n_segments, segment_size, 1)`): a note written before
    its segment is at -1, an invalid candidate at ``segment_size`` (after every query), a
    padding query at -2 (before every note, so that it sees none).
    """
    dtype = torch.int16 if segment_size < 2**15 - 2 else torch.int32
    n_segments = query_positions.shape[0]
    starts = start_position + segment_size * torch.arange(n_segments, device=positions.device)
    written_at = (positions - starts[:, None]).clamp_(-1, segment_size)
    written_at = written_at.masked_fill_(~valid, segment_size).to(dtype)
    queries = torch.arange(segment_size, device=positions.device, dtype=dtype).expand(
        n_segments, -1
    )
    queries = queries.masked_fill(query_positions < 0, -2)
    return written_at[:, :, None], queries[None, :, :, None]


def _first_written(before: torch.Tensor, size: int) -> torch.Tensor:
    """Each query's pool: the first ``size`` (best-first) of the candidates written before it.

    ``before`` `(batch, n_segments, segment_size, n_candidates)` bool (candidate written before
    the query, or at it for the pool just after the query's own write) -> the same shape,
    ``before`` where fewer than ``size`` earlier candidates are also ``before``. A note leaves
    a query's pool exactly when ``size`` better notes have been written (see the module
    docstring), so this is the pool a query sees.
    """
    n_candidates = before.shape[-1]
    if n_candidates <= size:
        return before
    dtype = torch.int16 if n_candidates < 2**15 else torch.int32
    # The first `size` candidates always qualify; the rest count from the number of those.
    head = before[..., :size].sum(-1, keepdim=True, dtype=dtype)
    tail = before[..., size:]
    tail &= tail.cumsum(-1, dtype=dtype).add_(head) <= size
    return before
