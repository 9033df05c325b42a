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
is the top-``size`` of the notes written before ``t``. Queries are processed in blocks; a
block's candidates are the pool at the block start plus the notes written inside the block
(compacted to the written ones), and a boolean membership mask `(batch, n_queries,
n_candidates)` says which candidates each query sees. Memory is O(length * (size + block)),
never O(length^2).
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
class PoolBlock:
    """The pool as a block of queries sees it.

    Queries are the positions ``start .. end - 1``; candidates `(batch, n_candidates, ...)`
    are the pool at ``start`` followed by the notes written inside the block; ``member``
    `(batch, end - start, n_candidates)` marks the candidates in each query's pool (notes of
    earlier positions), ``member_inclusive`` (when computed) the pool just after the query
    position wrote its own note.
    """

    start: int
    end: int
    values: torch.Tensor
    importance: torch.Tensor
    positions: torch.Tensor
    member: torch.Tensor
    member_inclusive: torch.Tensor | None


def pool_blocks(
    initial: StatePool,
    values: torch.Tensor,
    importance: torch.Tensor,
    written: torch.Tensor,
    start_position: int,
    block_size: int,
    inclusive: bool = False,
) -> tuple[list[PoolBlock], StatePool]:
    """The pool seen by every position of a chunk, block by block, and the pool after it.

    ``initial`` is the pool before the chunk; ``values`` `(batch, length, summary_dim)`,
    ``importance`` `(batch, length)` and ``written`` `(batch, length)` describe the notes the
    chunk's tokens write; ``start_position`` is the absolute position of the chunk's first
    token. With ``inclusive`` the blocks also carry ``member_inclusive``. Gradients flow
    through ``values`` (and ``initial.values``) into the blocks.
    """
    length = values.shape[1]
    size = initial.size
    device = values.device
    pool_values, pool_importance = initial.values, initial.importance
    pool_positions, pool_valid = initial.positions, initial.valid
    blocks = []
    for block_start in range(0, length, block_size):
        block_end = min(block_start + block_size, length)
        block_written = written[:, block_start:block_end]  # (batch, block)
        n_new = int(block_written.sum(dim=1).max())
        # Compact the block's written notes to the front, keeping their order.
        order = torch.argsort((~block_written).int(), dim=1, stable=True)[:, :n_new]
        new_valid = block_written.gather(1, order)  # (batch, n_new)
        new_positions = (order + start_position + block_start).masked_fill(~new_valid, -1)
        new_values = values[:, block_start:block_end].gather(
            1, order[..., None].expand(-1, -1, values.shape[-1])
        )
        new_importance = importance[:, block_start:block_end].gather(1, order)

        cand_values = torch.cat([pool_values.to(values.dtype), new_values], dim=1)
        cand_importance = torch.cat([pool_importance.to(importance.dtype), new_importance], 1)
        cand_positions = torch.cat([pool_positions, new_positions], dim=1)
        cand_valid = torch.cat([pool_valid, new_valid], dim=1)  # (batch, n_candidates)

        query_positions = torch.arange(
            start_position + block_start, start_position + block_end, device=device
        )
        best_first = rank_order(
            cand_importance.detach(), cand_positions, cand_valid, initial.policy
        )
        earlier = cand_positions[:, None, :] < query_positions[None, :, None]
        member = _top_members(cand_valid[:, None, :] & earlier, best_first, size)
        member_inclusive = None
        if inclusive:
            through = cand_positions[:, None, :] <= query_positions[None, :, None]
            member_inclusive = _top_members(cand_valid[:, None, :] & through, best_first, size)
        blocks.append(
            PoolBlock(
                start=start_position + block_start,
                end=start_position + block_end,
                values=cand_values,
                importance=cand_importance,
                positions=cand_positions,
                member=member,
                member_inclusive=member_inclusive,
            )
        )
        # The pool after the block: the best `size` valid candidates, in best-first order.
        top = best_first[:, :size]
        pool_values = cand_values.gather(1, top[..., None].expand(-1, -1, cand_values.shape[-1]))
        pool_importance = cand_importance.gather(1, top)
        pool_positions = cand_positions.gather(1, top)
        pool_valid = cand_valid.gather(1, top)
    final = StatePool(pool_values, pool_importance, pool_positions, pool_valid, initial.policy)
    return blocks, final


def _top_members(visible: torch.Tensor, best_first: torch.Tensor, size: int) -> torch.Tensor:
    """Keep, per query, the ``size`` best visible candidates.

    ``visible`` `(batch, n_queries, n_candidates)`, ``best_first`` `(batch, n_candidates)`
    (from :func:`rank_order`) -> `(batch, n_queries, n_candidates)` bool.
    """
    gather_index = best_first[:, None, :].expand_as(visible)
    visible_sorted = visible.gather(-1, gather_index)
    kept_sorted = visible_sorted & (visible_sorted.cumsum(-1) <= size)
    return torch.zeros_like(visible).scatter(-1, gather_index, kept_sorted)
