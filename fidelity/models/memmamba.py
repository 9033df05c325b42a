"""MemMamba (arXiv 2510.03279): Mamba with a note-taking state pool and sparse attention.

Each block, for input ``x`` `(batch, length, d_model)`:

1. ``h = x + mixer(norm(x))``: the Mamba-1 mixer (:mod:`fidelity.models.mamba`).
2. :class:`NoteBlock`: a learned scorer gives every position an importance
   ``I_token(h_t) = sigmoid(w . norm(h_t) + b)``; where it exceeds ``tau1`` the position writes a
   note to the layer's :class:`~fidelity.models.state_pool.StatePool`: a ``summary_dim``-wide
   summary, the max (or mean) over the last ``note_window`` positions of a linear projection
   of ``norm(h)``.
3. :class:`CrossTokenAttention`: where the state importance of the previous position,
   ``I_state(h_{t-1}) = sigmoid(v . norm(h_{t-1}) + c)``, exceeds ``tau2``, position ``t``
   attends over the notes in its layer's pool (notes of positions before ``t`` only).
4. :class:`CrossLayerAttention`, every ``cross_layer_every`` layers: position ``t`` attends
   over the pools of the preceding layers (the last ``cross_layer_every`` of them, or all
   earlier layers with ``cross_layer_scope="all"``) as they stand once position ``t`` has
   written its notes there: earlier layers' notes of ``t`` itself are visible (they depend on
   tokens up to ``t`` only), so the vertical path can carry the current token upwards.
5. Fusion into the residual stream, ``x' = h + F_tok(token context) + F_lay(layer context)``:
   ``weighted`` (learned per-channel weights; the paper's best), ``residual`` or ``gated``.

Thresholds and gradients: the decisions (write a note, fire cross-token attention) are hard
in the forward pass, and a straight-through estimator carries gradients to the scorers: the
written note is ``summary * g`` and the attention output is ``context * g`` with
``g = hard + (p - p.detach())`` (``p`` the sigmoid score), so ``g == hard`` in value and
``dg/dp == 1`` for the backward pass.

The attentions' output projections run inside the fusion, one matmul per context added
straight into the residual stream with the fusion weight folded in: the same arithmetic as
projecting, weighting and adding (tested), in fewer operations.

Choices the paper leaves open are configuration (:class:`MemMambaConfig`, each default with its
reason). The parallel forward is O(length * d): pools are computed segment by segment of
queries (:func:`~fidelity.models.state_pool.pool_segments`), never with a length x length mask;
segments are shorter where many positions write notes, so that a query's candidates stay
about three pools (:meth:`MemMambaConfig.query_segment_size`). The recurrent
:meth:`MemMambaLM.step` keeps explicit pools; both agree (tested).

Without gradients to the state scorer (evaluation), cross-token attention runs only at the
positions where its gate fires, the rest of its context being exactly the zero the gate would
make of it; observers that read its attention weights still get them for every position
(:class:`PoolAttentionOutput`); the attentions compute their scores a few segments at a time
and their weights only when read. With gradients, the memory norm and the linear maps that
read it run as one function by blocks of rows (:class:`_NormProjection`: one matmul, one
gradient of the norm's input, no full-length temporaries). These shortcuts are tested against
the paths they replace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.models.base import CausalLM, LMOutput, RMSNorm
from fidelity.models.mamba import (
    MambaConfig,
    MambaLayerCache,
    MambaMixer,
    init_lm_weights,
)
from fidelity.models.state_pool import POOL_POLICIES, PoolSegments, StatePool, pool_segments

POOLINGS = ("max", "mean")
FUSIONS = ("weighted", "residual", "gated")
CROSS_LAYER_SCOPES = ("window", "all")
MIN_KEYS = 16  # keys of a pool attention's softmax at least (masked zero rows fill up)
SCORES_BLOCK = 2**19  # attention scores per block of segments without gradients (2 MB)
NORM_ROWS = 512  # rows per block of the memory norm and its projections (256 KB at d 128)


@dataclass
class MemMambaConfig(MambaConfig):
    """MemMamba = Mamba + notes, pool and sparse cross-token / cross-layer attention."""

    model_type = "memmamba"

    summary_dim: int = 64  # width of a note (paper: 64)
    pool_size: int = 50  # notes per layer's pool (paper: 50; 10-100 barely matter)
    note_window: int = 16  # positions a note pools over (paper's "window", 16-128; unexplained)
    pooling: str = "max"  # how a note pools its window (paper's best: max)
    pool_policy: str = "priority"  # eviction: least important first (keeps notes far back)
    tau1: float = 0.5  # write a note where token importance > tau1
    tau2: float = 0.5  # fire cross-token attention where state importance > tau2
    write_init_bias: float = -2.0  # scorer bias at init: about 2% of positions write notes
    write_rate_target: float = 0.05  # training keeps about this fraction of positions writing
    write_rate_weight: float = 1.0  # weight of the write-rate loss (it trains the scorer only)
    n_heads: int = 4  # heads of the pool attentions (head width summary_dim / n_heads)
    cross_layer_every: int = 4  # p: cross-layer attention in layers p-1, 2p-1, ...
    cross_layer_scope: str = "window"  # read the pools of the p preceding layers ("all": all)
    fusion: str = "weighted"  # how contexts join the residual stream (paper's best: weighted)
    use_note_block: bool = True  # False: every position writes an unpooled note (ablation)
    use_cross_token: bool = True  # False: no cross-token attention (ablation)
    use_cross_layer: bool = True  # False: no cross-layer attention (ablation)
    block_size: int = 512  # most queries per segment of the parallel pool computation (speed only)

    def query_segment_size(self, write_rate: float) -> int:
        """Queries per segment of the parallel pool computation for a chunk where a fraction
        ``write_rate`` of the positions write notes (1 without the note block): ``block_size``
        (the config key saved checkpoints carry), or fewer, about ``2 * pool_size /
        write_rate``, so that a segment's candidates (the pool and the notes written inside
        the segment) stay about three pools at any write rate, instead of growing with the
        segment (the results do not depend on it: speed only)."""
        if not self.use_note_block:
            write_rate = 1.0
        if write_rate * self.block_size <= 2 * self.pool_size:
            return self.block_size
        return max(1, int(2 * self.pool_size / write_rate))

    def validate(self) -> None:
        super().validate()
        for name in ("summary_dim", "pool_size", "note_window", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.cross_layer_every, int) or self.cross_layer_every < 1:
            raise ValueError(f"cross_layer_every must be >= 1, got {self.cross_layer_every!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.summary_dim % self.n_heads:
            raise ValueError(
                f"summary_dim ({self.summary_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        choices = {
            "pooling": POOLINGS,
            "pool_policy": POOL_POLICIES,
            "fusion": FUSIONS,
            "cross_layer_scope": CROSS_LAYER_SCOPES,
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
        for name in ("tau1", "tau2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.write_rate_target < 1.0:
            raise ValueError(
                f"write_rate_target must lie in [0, 1), got {self.write_rate_target!r}"
            )

    def has_cross_layer(self, block: int) -> bool:
        """Whether block ``block`` (0-based) runs cross-layer attention."""
        p = self.cross_layer_every
        return self.use_cross_layer and block > 0 and (block + 1) % p == 0

    def cross_layer_sources(self, block: int) -> list[int]:
        """The earlier blocks whose pools block ``block`` reads (empty without cross-layer)."""
        if not self.has_cross_layer(block):
            return []
        first = 0 if self.cross_layer_scope == "all" else max(0, block - self.cross_layer_every)
        return list(range(first, block))


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in value (exactly: ``soft - soft.detach()`` is 0), with the gradient of
    ``soft`` (same shape)."""
    hard = hard.to(soft.dtype)
    if not soft.requires_grad:
        return hard
    return hard + (soft - soft.detach())


def window_pool(
    features: torch.Tensor, prefix: torch.Tensor, n_prefix_valid: int, mode: str
) -> torch.Tensor:
    """Causal pooling over the last ``window`` positions, window = ``prefix.shape[1] + 1``.

    ``features`` `(batch, length, dim)`; ``prefix`` `(batch, window - 1, dim)` holds the
    features of the positions before the chunk, of which the last ``n_prefix_valid`` exist (a
    sequence start has none). Returns `(batch, length, dim)`: position ``t`` pools the existing
    positions among ``t - window + 1 .. t``.
    """
    n_prefix = prefix.shape[1]
    if n_prefix == 0:
        return features
    length = features.shape[1]
    missing = n_prefix - n_prefix_valid
    fill = float("-inf") if mode == "max" else 0.0
    prefix = prefix.to(features.dtype).clone()
    prefix[:, :missing] = fill
    padded = torch.cat([prefix, features], dim=1)  # (batch, prefix + length, dim)
    window = n_prefix + 1
    if mode == "max" and not padded.requires_grad:
        return _sliding_max(padded, window)
    padded = padded.transpose(1, 2)  # (batch, dim, prefix + length)
    if mode == "max":  # with gradients: max_pool1d's backward is the cheaper one
        return F.max_pool1d(padded, window, stride=1).transpose(1, 2)
    sums = F.avg_pool1d(padded, window, stride=1).transpose(1, 2) * window
    counts = torch.arange(1, length + 1, device=features.device) + n_prefix_valid
    counts = counts.clamp(max=window).to(features.dtype)
    return sums / counts[None, :, None]


def _sliding_max(x: torch.Tensor, window: int) -> torch.Tensor:
    """Max over the last ``window`` positions: ``x`` `(batch, n, dim)` -> `(batch, n - window
    + 1, dim)`, position ``t`` the max of ``x[:, t .. t + window - 1]``. The same values as
    ``max_pool1d`` (a max is exact) from about log2(window) elementwise maxima over
    contiguous rows, without the transposed copies ``max_pool1d`` needs here."""
    span = 1  # x[:, t] is the max of `span` positions
    while span < window:
        step = min(span, window - span)
        x = torch.maximum(x[:, step:], x[:, :-step])
        span += step
    return x


@dataclass
class Notes:
    """What a :class:`NoteBlock` decides for a chunk: ``logits`` and ``importance =
    sigmoid(logits)`` `(batch, length)`, ``rate_logits`` (the same logits with the scorer's
    input detached, for the write-rate loss, so that it shapes the scorer and nothing else),
    ``written`` `(batch, length)` bool, ``summaries`` `(batch, length, summary_dim)` (straight-
    through gated), ``features`` `(batch, length, summary_dim)` (unpooled, for the window carry).
    """

    logits: torch.Tensor
    rate_logits: torch.Tensor
    importance: torch.Tensor
    written: torch.Tensor
    summaries: torch.Tensor
    features: torch.Tensor


class NoteBlock(nn.Module):
    """Token importance and note summaries: ``normed`` `(batch, length, d_model)` -> Notes."""

    def __init__(self, config: MemMambaConfig) -> None:
        super().__init__()
        self.tau1 = config.tau1
        self.pooling = config.pooling
        self.selective = config.use_note_block
        self.write_init_bias = config.write_init_bias
        self.scorer = nn.Linear(config.d_model, 1)
        self.summarizer = nn.Linear(config.d_model, config.summary_dim, bias=False)
        self.reset_scorer()

    @torch.no_grad()
    def reset_scorer(self) -> None:
        """Scorer init: logits ~ N(write_init_bias, 1) on RMS-normalized inputs."""
        self.scorer.weight.normal_(std=self.scorer.in_features**-0.5)
        self.scorer.bias.fill_(self.write_init_bias)

    def forward(
        self,
        normed: torch.Tensor,
        prefix: torch.Tensor,
        n_prefix_valid: int,
        projected: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> Notes:
        """``projected``: the summarizer's and the scorer's outputs (`(batch, length,
        summary_dim)`, `(batch, length)` or None without the note block) when the caller
        computed them (:class:`_NormProjections`); else they are computed here."""
        if projected is None:
            features = self.summarizer(normed)
        else:
            features, logits = projected
        if not self.selective:  # ablation: every position writes its own unpooled note
            ones = torch.ones(normed.shape[:2], device=normed.device, dtype=normed.dtype)
            return Notes(ones * math.inf, ones * math.inf, ones, ones.bool(), features, features)
        if projected is None:
            logits = self.scorer(normed)[..., 0]
        rate_logits = self.scorer(normed.detach())[..., 0] if torch.is_grad_enabled() else logits
        importance = torch.sigmoid(logits)
        written = importance > self.tau1
        pooled = window_pool(features, prefix, n_prefix_valid, self.pooling)
        summaries = pooled * straight_through(written, importance)[..., None]
        return Notes(logits, rate_logits, importance, written, summaries, features)


class StateTrigger(nn.Module):
    """State importance ``I_state``: ``normed`` `(batch, length, d_model)` -> `(batch, length)`
    in (0, 1); position ``t`` fires cross-token attention when position ``t - 1`` scores
    above ``tau2``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.scorer = nn.Linear(d_model, 1)

    def forward(self, normed: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` `(batch, length)`: the scorer's output when the caller computed it."""
        return torch.sigmoid(self.scorer(normed)[..., 0] if logits is None else logits)


@dataclass
class PoolView:
    """Candidates segments of queries attend over: ``values`` `(batch, n_segments,
    n_candidates, summary_dim)`, ``member`` `(batch, n_segments, n_queries, n_candidates)`
    (which of its segment's candidates each query sees), ``positions`` and ``blocks`` `(batch,
    n_segments, n_candidates)` (where each note came from: token position and the index of the
    block that wrote it; position -1 for an empty slot), ``query_positions`` `(n_segments,
    n_queries)` (-1 for padding queries past the chunk's end, which see no candidate).
    Positions and blocks are not used by the arithmetic; they let observers (forward hooks)
    name what was attended."""

    values: torch.Tensor
    member: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor
    query_positions: torch.Tensor


@dataclass
class PoolAttentionOutput:
    """``output`` `(batch, n_segments, n_queries, summary_dim)`: the attention-weighted values,
    heads side by side, before the output projection ``o_proj`` (the block's fusion applies
    it); ``weights`` `(batch, n_segments, n_heads, n_queries, n_candidates)` (zero outside each
    query's pool; all zero for an empty pool), of every query. Without gradients (and when
    the attention ran for selected queries only, ``output`` zero at the others) the weights
    are computed, for all queries, the first time they are read: observers that read them get
    them, the forward pass does not pay for them. ``_weights`` holds the tensor or the
    function that makes it."""

    output: torch.Tensor
    _weights: torch.Tensor | Callable[[], torch.Tensor]

    @property
    def weights(self) -> torch.Tensor:
        if callable(self._weights):
            self._weights = self._weights()
        return self._weights


class PoolAttention(nn.Module):
    """Multi-head attention of positions over pool notes (no positional encoding: a pool is a
    set). Queries ``normed`` `(batch, length, d_model)` in the segments of a ``PoolView``,
    over its candidates; all segments at once. Returns the context before the output projection
    ``o_proj``, which belongs to this module but runs in the block's :class:`Fusion`, merged
    with the fusion weight into one matmul."""

    def __init__(self, config: MemMambaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.q_proj = nn.Linear(config.d_model, config.summary_dim, bias=False)
        self.k_proj = nn.Linear(config.summary_dim, config.summary_dim, bias=False)
        self.v_proj = nn.Linear(config.summary_dim, config.summary_dim, bias=False)
        self.o_proj = nn.Linear(config.summary_dim, config.d_model, bias=False)
        with torch.no_grad():
            self.o_proj.weight.normal_(std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(
        self,
        normed: torch.Tensor,
        view: PoolView,
        selected: torch.Tensor | None = None,
        projected: torch.Tensor | None = None,
    ) -> PoolAttentionOutput:
        """Queries ``normed`` `(batch, length, d_model)`, cut into ``view``'s segments
        (``view.query_positions`` `(n_segments, n_queries)`; the positions past ``length``
        are padding, which sees no note). The queries are projected, then cut and padded a
        few segments at a time (:class:`_BlockedAttention`): padding ``normed`` would copy
        it, twice as wide, and its gradient again (the projection has no bias, so a padding
        query is zero either way; tested). With
        ``selected`` `(batch, length)` bool, only the selected queries attend: the rest get a
        zero output, and the weights are computed on first access (see
        :class:`PoolAttentionOutput`). Each selected query's output is what it gets without
        ``selected`` (the same arithmetic on fewer rows; tested). ``projected`` `(batch,
        length, summary_dim)`: ``q_proj(normed)`` when the caller computed it."""
        n_segments, n_queries = view.query_positions.shape
        if selected is None:
            q = self.q_proj(normed) if projected is None else projected
            context, weights = self._compute(q, view.values, view.member)
            return PoolAttentionOutput(context, weights)
        batch, length, width = normed.shape
        pad = n_segments * n_queries - length
        selected = F.pad(selected, (0, pad)) if pad else selected
        selected = selected.view(batch, n_segments, n_queries)
        n_selected = int(selected.sum(-1).max()) if selected.numel() else 0
        if 2 * n_selected > n_queries:  # most attend: all of them, cheaper than gathering
            q = self.q_proj(normed) if projected is None else projected
            context, weights = self._compute(q, view.values, view.member)
            return PoolAttentionOutput(context * selected[..., None], weights)
        output = normed.new_zeros(batch, n_segments, n_queries, self.o_proj.in_features)
        if n_selected:
            # each segment's selected queries first, in order; padding rows see no note
            rows = torch.argsort(selected.logical_not().view(torch.uint8), dim=-1, stable=True)
            rows = rows[..., :n_selected]  # (batch, n_segments, n_selected)
            member = view.member.gather(
                2, rows[..., None].expand(-1, -1, -1, view.member.shape[-1])
            )
            member &= selected.gather(2, rows)[..., None]
            # rows past the chunk's end are padding, not selected: any real row will do
            positions = rows + n_queries * torch.arange(n_segments, device=rows.device)[:, None]
            positions = positions.clamp_(max=length - 1).flatten(1)
            if projected is None:  # (batch, n_segments * n_selected, summary_dim)
                q = self.q_proj(normed.gather(1, positions[..., None].expand(-1, -1, width)))
            else:
                q = projected.gather(1, positions[..., None].expand(-1, -1, projected.shape[-1]))
            context, _ = self._compute(q, view.values, member)
            output.scatter_(2, rows[..., None].expand_as(context), context)
        return PoolAttentionOutput(output, lambda: self._weights(normed, view.values, view.member))

    def _compute(
        self, q: torch.Tensor, values: torch.Tensor, member: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | Callable[[], torch.Tensor]]:
        """Queries ``q`` `(batch, length, summary_dim)` (``q_proj`` of the queries, in segments
        of ``member.shape[2]`` positions, the last one padded: see :func:`_query_block`) over
        candidate ``values`` `(batch, segments, candidates, summary_dim)` where ``member``
        `(batch, segments, queries, candidates)` -> (context `(batch, segments, queries,
        summary_dim)`, weights `(batch, segments, heads, queries, candidates)`, as the
        function that computes them).

        Masking is one added bias `(batch, segments, 1, queries, keys)` (0 for a member, the
        lowest float otherwise: its softmax weight underflows to exactly 0), broadcast over
        the heads. The keys are the candidates, a null note (zero key and value) that only
        queries with an empty pool see (their softmax puts all its weight there, so their
        context and their weights over the real candidates are exactly zero, with no special
        case), and masked zero rows up to ``MIN_KEYS`` keys (a softmax over fewer keys than a
        vector register holds runs a scalar loop, ~10x slower per element).

        The scores are computed a few segments at a time (about ``SCORES_BLOCK`` of them,
        resident in cache, instead of one tensor of every segment's scores, which at long
        chunks costs page faults on every call; the backward pass computes them again), the
        same arithmetic per segment (:class:`_BlockedAttention`); the weights only if the
        returned function is called."""
        k, v = self._keys_values(values)
        context = _BlockedAttention.apply(q, k, v, member)
        return context, lambda: _blocked_weights(q, k, member)

    def _weights(
        self, normed: torch.Tensor, values: torch.Tensor, member: torch.Tensor
    ) -> torch.Tensor:
        """The weights of :meth:`_compute` alone (its context is not computed), for queries
        ``normed`` `(batch, length, d_model)`."""
        k, _ = self._keys_values(values)
        q = self.q_proj(normed)
        return _blocked_weights(q, k, member)

    def _keys_values(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) `(batch, segments, heads, keys, head width)`, contiguous, the scale folded
        into ``k``; the keys are the candidates, then zero rows (see :meth:`_compute`)."""
        heads = self.n_heads
        scale = (self.k_proj.out_features // heads) ** -0.5
        pad = (0, 0, 0, max(1, MIN_KEYS - values.shape[2]))
        k = F.pad(self.k_proj(values) * scale, pad)
        v = F.pad(self.v_proj(values), pad)
        return _split_heads(k, heads), _split_heads(v, heads)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(batch, segments, rows, heads * width)` -> `(batch, segments, heads, rows, width)`,
    contiguous (batched matmuls over strided heads are slower than the copy)."""
    return x.unflatten(-1, (heads, -1)).transpose(2, 3).contiguous()


def _mask_bias(member: torch.Tensor, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """``member`` `(batch, segments, queries, candidates)` -> the attention bias `(batch,
    segments, 1, queries, n_keys)`: 0 where a query sees a key, the lowest float elsewhere.
    Key ``candidates`` (the null note) is seen by the queries that see no candidate; the keys
    after it by none."""
    n_candidates = member.shape[-1]
    nonempty = member.view(torch.uint8).amax(dim=-1, keepdim=True)  # (any() is slower)
    visible = member.new_zeros(*member.shape[:-1], n_keys)
    visible[..., :n_candidates] = member
    visible[..., n_candidates : n_candidates + 1] = nonempty == 0
    return visible.to(dtype).sub_(1).mul_(torch.finfo(dtype).max)[:, :, None]


def _softmax_weights(q: torch.Tensor, k: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T + bias)`` `(batch, segments, heads, queries, keys)` for ``q``
    `(batch, segments, heads, queries, width)`, ``k`` `(..., keys, width)` and the bias of
    ``member`` (:func:`_mask_bias`)."""
    scores = q @ k.transpose(-1, -2)
    scores += _mask_bias(member, k.shape[-2], q.dtype)
    return torch.softmax(scores, -1)  # (the in-place `out=` form measured slower)


@torch.no_grad()
def _blocked_weights(q: torch.Tensor, k: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """:func:`_softmax_weights` over the candidates only, `(batch, segments, heads, queries,
    candidates)` for ``q`` `(batch, length, heads * width)` (:func:`_query_block`), ``k``
    `(batch, segments, heads, keys, width)` and ``member`` `(batch, segments, queries,
    candidates)`, a few segments at a time (:func:`_segment_blocks`) into the one tensor
    returned: reading the weights of a long chunk costs that tensor, not three as large."""
    n_candidates = member.shape[-1]
    weights = q.new_empty(*k.shape[:3], member.shape[2], n_candidates)
    for block in _segment_blocks(member, k):
        q_block = _query_block(q, block, member.shape[2], k.shape[2])
        block_weights = _softmax_weights(q_block, k[:, block], member[:, block])
        weights[:, block] = block_weights[..., :n_candidates]
    return weights


class _BlockedAttention(torch.autograd.Function):
    """``softmax(q k^T + bias) v`` for ``q`` `(batch, length, heads * width)` (queries in
    segments of ``member.shape[2]`` positions, the last one padded: :func:`_query_block`),
    ``k``, ``v`` `(batch, segments, heads, keys, width)` and the bias of ``member``
    `(batch, segments, queries, candidates)` (:func:`_mask_bias`) -> the context `(batch,
    segments, queries, heads * width)`, heads side by side.

    A few segments at a time (about ``SCORES_BLOCK`` scores per block): the block's queries
    are cut, padded and split into heads there, and the scores, weights and their gradients
    of one block stay in cache; no tensor as large as every segment's scores is made, nor a
    padded copy of the queries or of their gradient (on CPU each costs page faults). The
    backward pass computes each block's weights again instead of keeping them. The same
    arithmetic per segment as autograd through the plain operations (tested)."""

    @staticmethod
    def forward(ctx, q, k, v, member):
        ctx.save_for_backward(q, k, v, member)
        batch, n_segments, heads, _, width = k.shape
        n_queries = member.shape[2]
        context = q.new_empty(batch, n_segments, n_queries, heads * width)
        for block in _segment_blocks(member, k):
            q_block = _query_block(q, block, n_queries, heads)
            weights = _softmax_weights(q_block, k[:, block], member[:, block])
            context[:, block] = (weights @ v[:, block]).transpose(2, 3).flatten(-2)
        return context

    @staticmethod
    def backward(ctx, grad_context):
        q, k, v, member = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        heads, n_queries = k.shape[2], member.shape[2]
        # (batch, segments, heads, queries, width), a strided view
        grad_context = grad_context.unflatten(-1, (heads, -1)).transpose(2, 3)
        for block in _segment_blocks(member, k):
            q_block, k_block = _query_block(q, block, n_queries, heads), k[:, block]
            weights = _softmax_weights(q_block, k_block, member[:, block])
            grad_block = grad_context[:, block].contiguous()
            grad_v[:, block] = weights.transpose(-1, -2) @ grad_block
            grad = grad_block @ v[:, block].transpose(-1, -2)  # d loss / d weights, d scores
            torch.ops.aten._softmax_backward_data.out(
                grad, weights, -1, grad.dtype, grad_input=grad
            )
            grad_k[:, block] = grad.transpose(-1, -2) @ q_block
            # back to (batch, positions, heads * width), without the padding rows
            rows = slice(block.start * n_queries, min(block.stop * n_queries, q.shape[1]))
            grad_rows = (grad @ k_block).transpose(2, 3).flatten(-2).flatten(1, 2)
            grad_q[:, rows] = grad_rows[:, : rows.stop - rows.start]
        return grad_q, grad_k, grad_v, None


class _NormProjection(torch.autograd.Function):
    """``h`` `(rows, d)` -> (``normed @ weight.T + bias`` `(rows, k)`, ``normed`` `(rows, d)`)
    with ``normed`` the :class:`~fidelity.models.base.RMSNorm` of ``h`` (weight
    ``norm_weight`` `(d,)`, ``eps``), ``weight`` `(k, d)` and ``bias`` `(k,)` several linear
    maps side by side: the same arithmetic as the norm followed by each map (tested).

    By blocks of ``NORM_ROWS`` rows, so that the norm's temporaries stay in cache instead of
    each costing a full-size tensor (fresh pages at long chunks); the backward pass computes
    each block's norm again from ``h`` and the saved reciprocal RMS `(rows, 1)`, and gives
    ``h`` one gradient (one matmul for all maps). ``normed`` is returned for reading only:
    no gradient flows back through it (its uses with gradients go through the maps)."""

    @staticmethod
    def forward(ctx, h, norm_weight, weight, bias, eps):
        projection = h.new_empty(h.shape[0], weight.shape[0])
        normed = torch.empty_like(h)
        rstd = h.new_empty(h.shape[0], 1)
        for rows in _row_blocks(h.shape[0]):
            x = h[rows]
            torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps, out=rstd[rows])
            block = torch.mul(x, rstd[rows], out=normed[rows]).mul_(norm_weight)
            torch.addmm(bias, block, weight.t(), out=projection[rows])
        ctx.save_for_backward(h, rstd, norm_weight, weight)
        ctx.mark_non_differentiable(normed)
        ctx.set_materialize_grads(False)  # no zero tensor for the gradient of ``normed``
        return projection, normed

    @staticmethod
    def backward(ctx, grad_projection, _grad_normed):
        if grad_projection is None:
            return None, None, None, None, None
        h, rstd, norm_weight, weight = ctx.saved_tensors
        grad_projection = grad_projection.contiguous()
        grad_h = torch.empty_like(h)
        grad_norm_weight = torch.zeros_like(norm_weight)
        grad_weight = torch.zeros_like(weight)
        for rows in _row_blocks(h.shape[0]):
            grad = grad_projection[rows]  # (block, k)
            unit = h[rows] * rstd[rows]  # the norm before its weight
            grad_weight.addmm_(grad.t(), unit * norm_weight)
            grad_normed = grad @ weight  # (block, d)
            grad_norm_weight += (grad_normed * unit).sum(0)
            grad_unit = grad_normed.mul_(norm_weight)
            # d unit / d h = rstd * (I - unit unit^T / d)
            dot = (grad_unit * unit).mean(-1, keepdim=True)
            torch.mul(grad_unit.sub_(unit.mul_(dot)), rstd[rows], out=grad_h[rows])
        return grad_h, grad_norm_weight, grad_weight, grad_projection.sum(0), None


def _row_blocks(n_rows: int) -> list[slice]:
    """Slices of ``NORM_ROWS`` rows covering ``n_rows``."""
    return [slice(first, first + NORM_ROWS) for first in range(0, n_rows, NORM_ROWS)]


def _segment_blocks(member: torch.Tensor, k: torch.Tensor) -> list[slice]:
    """Slices of the segment dimension of ``member`` `(batch, segments, queries,
    candidates)` and ``k`` `(batch, segments, heads, keys, width)` with about
    ``SCORES_BLOCK`` scores each (at least one segment), none past the last segment."""
    batch, n_segments, heads, n_keys, _ = k.shape
    step = max(1, SCORES_BLOCK // max(1, batch * heads * member.shape[2] * n_keys))
    return [slice(first, min(first + step, n_segments)) for first in range(0, n_segments, step)]


def _query_block(q: torch.Tensor, block: slice, n_queries: int, heads: int) -> torch.Tensor:
    """The queries of the segments ``block`` (:func:`_segment_blocks`): ``q`` `(batch,
    length, heads * width)`, cut into segments of ``n_queries`` positions, the last one padded
    with zero rows -> `(batch, block's segments, heads, n_queries, width)`, contiguous
    (batched matmuls over strided heads are slower than the copy)."""
    rows = q[:, block.start * n_queries : block.stop * n_queries]
    pad = (block.stop - block.start) * n_queries - rows.shape[1]
    rows = F.pad(rows, (0, 0, 0, pad)) if pad else rows
    return (
        rows.unflatten(1, (-1, n_queries)).unflatten(-1, (heads, -1)).transpose(2, 3).contiguous()
    )


class CrossTokenAttention(PoolAttention):
    """Attention of a position over its own layer's pool (notes of earlier positions)."""


class CrossLayerAttention(PoolAttention):
    """Attention of a position over the pools of preceding layers."""


class Fusion(nn.Module):
    """Adds memory contexts to the residual stream: ``h`` `(batch, length, d_model)`, a list
    of contexts before their attention's output projection `(batch, length, summary_dim)` and
    those projections (``o_proj`` layers) -> `(batch, length, d_model)`. With ``c_i =
    o_proj_i(context_i)``:

    ``weighted``: ``h + sum_i w_i * c_i`` with learned per-channel ``w_i``; ``residual``:
    ``h + sum_i c_i``; ``gated``: ``h + sum_i sigmoid(G_i [h; c_i]) * c_i``. The first two run
    as one matmul per context added into ``h`` (``w_i * (W_i x) = (w_i W_i) x``), so that
    ``c_i`` is never formed.
    """

    def __init__(self, d_model: int, mode: str, n_contexts: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == "weighted":
            self.weights = nn.Parameter(torch.ones(n_contexts, d_model))
        elif mode == "gated":
            self.gates = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(n_contexts))

    def forward(
        self, h: torch.Tensor, contexts: list[torch.Tensor], projections: list[nn.Linear]
    ) -> torch.Tensor:
        if self.mode == "gated":
            out = h
            for index, (context, projection) in enumerate(zip(contexts, projections, strict=True)):
                projected = projection(context)
                gate = torch.sigmoid(self.gates[index](torch.cat([h, projected], dim=-1)))
                out = out + gate * projected
            return out
        out = h.reshape(-1, h.shape[-1])
        for index, (context, projection) in enumerate(zip(contexts, projections, strict=True)):
            weight = projection.weight  # (d_model, summary_dim)
            if self.mode == "weighted":
                weight = weight * self.weights[index][:, None]
            flat = context.reshape(-1, context.shape[-1])
            # the first matmul makes a new tensor, the others add into it
            out = torch.addmm(out, flat, weight.t()) if index == 0 else out.addmm_(flat, weight.t())
        return out.view(h.shape)


@dataclass
class PoolChunk:
    """A block's pool over a chunk: what :func:`pool_segments` was given (the ``initial`` pool,
    the chunk's ``notes``, ``start_position``), the ``segment_size`` asked for and the
    ``segments`` it gave. Cross-layer attention reads the pools of several blocks with one
    segmentation: :meth:`segments_at` computes them again at another segment size."""

    initial: StatePool
    notes: Notes
    start_position: int
    segment_size: int
    segments: PoolSegments

    def segments_at(self, segment_size: int) -> PoolSegments:
        """The segments (with ``member_inclusive``) at ``segment_size``."""
        if segment_size == self.segment_size and self.segments.member_inclusive is not None:
            return self.segments
        chunk, _ = self.of(self.initial, self.notes, self.start_position, segment_size, True)
        return chunk.segments

    @classmethod
    def of(
        cls,
        initial: StatePool,
        notes: Notes,
        start_position: int,
        segment_size: int,
        inclusive: bool,
    ) -> tuple[PoolChunk, StatePool]:
        """:func:`pool_segments` over the chunk's ``notes`` from the ``initial`` pool (its
        ``inclusive`` as there) -> (the chunk, the pool after it)."""
        segments, final_pool = pool_segments(
            initial,
            notes.summaries,
            notes.importance,
            notes.written,
            start_position,
            segment_size,
            inclusive=inclusive,
        )
        return cls(initial, notes, start_position, segment_size, segments), final_pool


@dataclass
class MemMambaLayerCache(MambaLayerCache):
    """A block's recurrent state: the mixer's (``conv``, ``ssm``), its ``pool``, the unpooled
    features of the last ``note_window - 1`` positions ``note_prefix`` `(batch, note_window -
    1, summary_dim)`, and the previous position's state importance `(batch,)`."""

    pool: StatePool
    note_prefix: torch.Tensor
    previous_state_importance: torch.Tensor


class MemMambaBlock(nn.Module):
    """One MemMamba block: `(batch, length, d_model)` -> `(batch, length, d_model)` (see the
    module docstring for the five steps)."""

    def __init__(self, config: MemMambaConfig, block: int) -> None:
        super().__init__()
        self.config = config
        self.block = block
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = MambaMixer(config)
        self.memory_norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.note_block = NoteBlock(config)
        self.trigger = StateTrigger(config.d_model) if config.use_cross_token else None
        self.cross_token = CrossTokenAttention(config) if config.use_cross_token else None
        has_cross_layer = config.has_cross_layer(block)
        self.pool_is_read_by_later_blocks = any(
            block in config.cross_layer_sources(reader) for reader in range(config.n_layer)
        )
        self.cross_layer = CrossLayerAttention(config) if has_cross_layer else None
        n_contexts = int(config.use_cross_token) + int(has_cross_layer)
        self.fusion = Fusion(config.d_model, config.fusion, n_contexts)

    def forward(
        self,
        x: torch.Tensor,
        cache: MemMambaLayerCache | None,
        sources: list[tuple[int, PoolChunk]],
        start_position: int,
    ) -> tuple[torch.Tensor, PoolChunk, torch.Tensor]:
        """``x`` `(batch, length, d_model)` starting at absolute ``start_position`` -> (block
        output `(batch, length, d_model)`, this block's pool over the chunk, token-importance
        logits `(batch, length)`). ``sources`` are the pools of the blocks cross-layer
        attention reads, as (block index, pool)."""
        config = self.config
        state = cache if cache is not None else self.init_cache(x.shape[0], x.device, x.dtype)
        h = x + self.mixer(self.norm(x), cache)
        normed, projected = self._memory_inputs(h)
        n_prefix_valid = min(config.note_window - 1, start_position)
        note_projections = None
        if projected is not None and self.note_block.summarizer in projected:
            scorer = projected.get(self.note_block.scorer)
            note_projections = (
                projected[self.note_block.summarizer],
                None if scorer is None else scorer[..., 0],
            )
        notes = self.note_block(normed, state.note_prefix, n_prefix_valid, note_projections)
        length = x.shape[1]
        write_rate = float(notes.written.sum(1).max()) / length if length else 0.0
        segment_size = config.query_segment_size(write_rate)
        inclusive = self.pool_is_read_by_later_blocks
        chunk, final_pool = PoolChunk.of(state.pool, notes, start_position, segment_size, inclusive)
        segments = chunk.segments
        contexts, projections = [], []
        if self.cross_token is not None:
            trigger_logits = None if projected is None else projected[self.trigger.scorer][..., 0]
            state_importance = self.trigger(normed, trigger_logits)  # (batch, length)
            previous = torch.cat(
                [
                    state.previous_state_importance[:, None].to(h.dtype),
                    state_importance[:, :-1],
                ],
                dim=1,
            )
            fired = previous > config.tau2
            gate = straight_through(fired, previous)
            token_sources = [(self.block, segments)]
            queries = None if projected is None else projected[self.cross_token.q_proj]
            if gate.requires_grad:  # the scorer's gradient needs the context everywhere
                attended = self._attend(self.cross_token, normed, queries, token_sources, False)
                contexts.append(gate[..., None] * attended)
            else:  # the context where the gate is open, zero elsewhere: gate * context
                contexts.append(
                    self._attend(self.cross_token, normed, queries, token_sources, False, fired)
                )
            projections.append(self.cross_token.o_proj)
        if self.cross_layer is not None and sources:
            size = min(pool.segment_size for _, pool in sources)  # the most notes decide
            layer_sources = [(block, pool.segments_at(size)) for block, pool in sources]
            queries = None if projected is None else projected[self.cross_layer.q_proj]
            contexts.append(
                self._attend(self.cross_layer, normed, queries, layer_sources, inclusive=True)
            )
            projections.append(self.cross_layer.o_proj)
        out = self.fusion(h, contexts, projections)
        if cache is not None:
            cache.pool = final_pool
            keep = cache.note_prefix.shape[1]
            recent = notes.features[:, notes.features.shape[1] - keep :]  # the last `keep` only
            carried = torch.cat([cache.note_prefix, recent.to(cache.note_prefix.dtype)], 1)
            cache.note_prefix = carried[:, carried.shape[1] - keep :]
            if self.trigger is not None:
                cache.previous_state_importance = state_importance[:, -1].detach()
        return out, chunk, notes.rate_logits

    def _memory_inputs(
        self, h: torch.Tensor
    ) -> tuple[torch.Tensor, dict[nn.Linear, torch.Tensor] | None]:
        """``memory_norm(h)`` `(batch, length, d_model)` and, with gradients, the outputs
        `(batch, length, out_features)` of the linear maps the block applies to it
        (:meth:`_projections`), keyed by map, from one :class:`_NormProjection`: one matmul
        and one gradient of the norm's input instead of one per map, summed, and the norm's
        temporaries by blocks of rows (at long chunks each full-size temporary costs fresh
        pages). Without gradients (or in half precision) None: each module projects for
        itself (cross-token attention only at the positions where its gate fires)."""
        maps = self._projections()
        if not maps or not torch.is_grad_enabled() or h.dtype not in (torch.float32, torch.float64):
            return self.memory_norm(h), None
        biases = [
            m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in maps
        ]
        projection, normed = _NormProjection.apply(
            h.reshape(-1, h.shape[-1]),
            self.memory_norm.weight,
            torch.cat([m.weight for m in maps]),
            torch.cat(biases),
            self.memory_norm.eps,
        )
        outputs = projection.view(*h.shape[:-1], -1).split([m.out_features for m in maps], -1)
        return normed.view(h.shape), dict(zip(maps, outputs, strict=True))

    def _projections(self) -> list[nn.Linear]:
        """The linear maps whose outputs carry gradients from the memory norm's output: the
        note block's where some attention reads this block's notes (else its outputs
        reach no loss: it projects the read-only norm itself, and its maps get no gradient,
        as without this path), the state scorer's and the attentions' queries."""
        maps = []
        if self.cross_token is not None or self.pool_is_read_by_later_blocks:
            maps.append(self.note_block.summarizer)
            if self.note_block.selective:
                maps.append(self.note_block.scorer)
        if self.cross_token is not None:
            maps += [self.trigger.scorer, self.cross_token.q_proj]
        if self.cross_layer is not None:
            maps.append(self.cross_layer.q_proj)
        return maps

    def _attend(
        self,
        attention: PoolAttention,
        normed: torch.Tensor,
        queries: torch.Tensor | None,
        sources: list[tuple[int, PoolSegments]],
        inclusive: bool,
        selected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``attention``, all query segments at once, over the union of the ``sources``'
        pools: ``normed`` `(batch, length, d_model)` (with ``queries``, its ``q_proj``, when
        already computed) -> the context before ``o_proj`` `(batch, length, summary_dim)`;
        with ``selected`` `(batch, length)` bool, at the selected positions only (zero
        elsewhere)."""
        batch, length, _ = normed.shape
        n_segments, segment_size = sources[0][1].query_positions.shape
        view = PoolView(
            values=torch.cat([segments.values for _, segments in sources], dim=2),
            member=torch.cat(
                [s.member_inclusive if inclusive else s.member for _, s in sources],
                dim=-1,
            ),
            positions=torch.cat([segments.positions for _, segments in sources], dim=2),
            blocks=torch.cat(
                [torch.full_like(segments.positions, block) for block, segments in sources], dim=2
            ),
            query_positions=sources[0][1].query_positions,
        )
        output = attention(normed, view, selected, queries).output
        return output.view(batch, n_segments * segment_size, -1)[:, :length]

    def step(
        self,
        x: torch.Tensor,
        cache: MemMambaLayerCache,
        source_pools: list[tuple[int, StatePool]],
        position: int,
    ) -> torch.Tensor:
        """One position ``x`` `(batch, d_model)` at absolute ``position``, with explicit pools;
        ``source_pools`` are the (already updated) pools of the blocks cross-layer reads."""
        config = self.config
        h = x + self.mixer.step(self.norm(x), cache)
        normed = self.memory_norm(h)[:, None]  # (batch, 1, d_model)
        n_prefix_valid = min(config.note_window - 1, position)
        notes = self.note_block(normed, cache.note_prefix, n_prefix_valid)
        contexts, projections = [], []
        if self.cross_token is not None:
            previous = cache.previous_state_importance.to(h.dtype)
            gate = (previous > config.tau2).to(h.dtype)
            attended = self.cross_token(
                normed, _explicit_view([(self.block, cache.pool)], position, False)
            )
            contexts.append(gate[:, None] * attended.output[:, 0, 0])
            projections.append(self.cross_token.o_proj)
            cache.previous_state_importance = self.trigger(normed)[:, 0]
        cache.pool.write(
            notes.summaries[:, 0], notes.importance[:, 0], position, notes.written[:, 0]
        )
        carried = torch.cat([cache.note_prefix, notes.features.to(cache.note_prefix.dtype)], 1)
        cache.note_prefix = carried[:, 1:]
        if self.cross_layer is not None and source_pools:
            attended = self.cross_layer(
                normed, _explicit_view(source_pools, position, inclusive=True)
            )
            contexts.append(attended.output[:, 0, 0])
            projections.append(self.cross_layer.o_proj)
        return self.fusion(h, contexts, projections)

    def init_cache(self, batch_size: int, device, dtype) -> MemMambaLayerCache:
        config = self.config
        mixer_cache = self.mixer.init_cache(batch_size, device, dtype)
        return MemMambaLayerCache(
            conv=mixer_cache.conv,
            ssm=mixer_cache.ssm,
            pool=StatePool.empty(
                batch_size, config.pool_size, config.summary_dim, config.pool_policy, device, dtype
            ),
            note_prefix=torch.zeros(
                batch_size, config.note_window - 1, config.summary_dim, device=device, dtype=dtype
            ),
            previous_state_importance=torch.zeros(batch_size, device=device, dtype=dtype),
        )


def _explicit_view(pools: list[tuple[int, StatePool]], position: int, inclusive: bool) -> PoolView:
    """A one-segment, one-query view over explicit pools: the notes written before
    ``position`` (or up to it, with ``inclusive``)."""
    member = torch.cat([pool.visible(position, inclusive) for _, pool in pools], dim=1)
    return PoolView(
        values=torch.cat([pool.values for _, pool in pools], dim=1)[:, None],
        member=member[:, None, None],
        positions=torch.cat([pool.positions for _, pool in pools], dim=1)[:, None],
        blocks=torch.cat([torch.full_like(pool.positions, block) for block, pool in pools], 1)[
            :, None
        ],
        query_positions=torch.tensor([[position]], device=pools[0][1].values.device),
    )


class MemMambaLM(CausalLM):
    """MemMamba language model: ``input_ids`` `(batch, length)` -> ``LMOutput`` with logits
    `(batch, length, vocab)`."""

    config: MemMambaConfig

    def __init__(self, config: MemMambaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(MemMambaBlock(config, i) for i in range(config.n_layer))
        init_lm_weights(self)
        for block in self.layers:  # init_lm_weights zeroes every bias, the scorers' included
            block.note_block.reset_scorer()
        self._aux_loss: torch.Tensor | None = None

    def _forward_blocks(self, x, cache, hidden):
        start = cache.position if cache is not None else 0
        pools_by_block: dict[int, PoolChunk] = {}
        write_logits = []
        last_reader = {}  # source block -> last block that reads its pool
        for reader in range(self.config.n_layer):
            for source in self.config.cross_layer_sources(reader):
                last_reader[source] = reader
        for index, block in enumerate(self.layers):
            sources = [
                (source, pools_by_block[source])
                for source in self.config.cross_layer_sources(index)
            ]
            x, pool, logits = block(
                x, cache.layers[index] if cache is not None else None, sources, start
            )
            write_logits.append(logits)
            if index in last_reader:
                pools_by_block[index] = pool
            for source, _ in sources:
                if last_reader[source] == index:
                    del pools_by_block[source]
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.position += x.shape[1]
        if self.config.write_rate_target > 0 and self.config.use_note_block and self.training:
            self._aux_loss = (
                self.config.write_rate_weight
                * torch.stack([self._write_rate_loss(logits) for logits in write_logits]).mean()
            )
        return x

    def _write_rate_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy pulling, in each sequence, the top ``write_rate_target``
        fraction of importance logits `(batch, length)` above the write threshold and the rest
        below it (labels from the scorer's own, detached ranking)."""
        length = logits.shape[1]
        k = max(1, math.ceil(self.config.write_rate_target * length))
        threshold = math.log(self.config.tau1 / (1 - self.config.tau1))
        top = logits.detach().topk(k, dim=1).indices
        labels = torch.zeros_like(logits).scatter(1, top, 1.0)
        return F.binary_cross_entropy_with_logits(logits.float() - threshold, labels.float())

    def forward(self, input_ids, cache=None, output_hidden_states=False) -> LMOutput:
        """As :meth:`CausalLM.forward`; in training mode also ``aux_loss``, the write-rate
        term (:meth:`_write_rate_loss` averaged over layers, times ``write_rate_weight``).

        Why it exists: the language-model loss reaches the scorer only through notes that were
        written (straight-through), so a scorer that drifts below ``tau1`` everywhere would
        never recover and the memory would die (seen in practice). The write-rate term keeps
        about ``write_rate_target`` of the positions writing; which positions, is learned from
        the language-model loss through the written notes."""
        self._aux_loss = None
        output = super().forward(input_ids, cache, output_hidden_states)
        output.aux_loss, self._aux_loss = self._aux_loss, None
        return output

    def _step_blocks(self, x, cache):
        position = cache.position
        for index, block in enumerate(self.layers):
            sources = [
                (source, cache.layers[source].pool)
                for source in self.config.cross_layer_sources(index)
            ]
            x = block.step(x, cache.layers[index], sources, position)
        cache.position += 1
        return x
