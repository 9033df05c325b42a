"""Compressive Transformer (Rae et al. 2019): attention over memory and compressed memory.

The sequence is cut into segments of ``segment_length`` tokens, processed in order. Every layer
keeps, per sequence:

- a **memory**: its own inputs (the residual stream entering the block) at the last
  ``memory_length`` positions of earlier segments (FIFO);
- a **compressed memory**: when the memory overflows, the states that fall out are grouped by
  ``compression_rate`` consecutive positions and each group becomes one slot (``max`` or
  ``mean`` pooling, or a learned 1D convolution of kernel and stride ``compression_rate``,
  ``compression="conv"``, initialized to mean pooling); FIFO of ``compressed_memory_length``
  slots. Evicted states that do not yet fill a group wait in a pending buffer (not attended);
  with ``segment_length`` a multiple of ``compression_rate`` and ``memory_length`` a multiple
  of ``segment_length`` it is always empty.

Each position attends (causally) over ``[compressed memory; memory; segment so far]``. A layer's
memory depends only on that layer's inputs, so the parallel forward runs each block over the
whole sequence, segment after segment inside the block: ``model.layers[i]`` maps
`(batch, length, d_model)` to `(batch, length, d_model)` like every model of the toolkit.

Positions are rotary (RoPE), by slot index in the attended sequence ``[compressed memory;
memory; segment]``: like Transformer-XL's relative encoding that the paper uses, a score
depends only on the slot distance (a compressed slot counts as one step), but RoPE needs no
extra parameters and matches the toolkit's Transformer baseline, so comparisons isolate the
memory mechanism.

Training: memories enter the memory detached from the graph (no backpropagation across
segments, as in the paper). The paper trains the compression network with an auxiliary
attention-reconstruction loss; that loss is omitted here: the ``conv`` compressor's weights
learn from the language-model loss through the compressed slots that later segments of the
same forward call read (its inputs are detached). A cache always holds detached tensors.

With a cache (memories, pending states, the current partial segment's inputs, keys and
values, and the keys/values of the memory for that segment), ``forward`` chunk by chunk (chunks
need not align with segments) and ``step`` token by token give the same logits as one forward.
The cache is bounded: at most ``memory_length + compressed_memory_length + compression_rate - 1
+ segment_length`` states per layer, whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig

COMPRESSIONS = ("max", "mean", "conv")


@dataclass
class CompressiveConfig(ModelConfig):
    """Compressive Transformer language model (pre-LayerNorm blocks, rotary positions)."""

    model_type = "compressive"

    n_heads: int = 4  # attention heads (head width d_model / n_heads, even for RoPE)
    mlp_ratio: int = 4  # MLP width = mlp_ratio * d_model (Transformer convention)
    segment_length: int = 512  # tokens per segment (paper, PG-19: 512)
    memory_length: int = 512  # memory slots per layer (paper, PG-19: 512)
    compressed_memory_length: int = 512  # compressed slots per layer (paper, PG-19: 512)
    compression_rate: int = 2  # memory states per compressed slot (paper, PG-19: 2)
    compression: str = "conv"  # "max", "mean" or learned "conv" (paper's best: conv)
    rope_base: float = 10000.0  # rotary frequency base (RoFormer, GPT-NeoX default)
    init_std: float = 0.02  # std of weight init (GPT-2 / Pythia convention)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        super().validate()
        for name in ("n_heads", "mlp_ratio", "segment_length", "compression_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("memory_length", "compressed_memory_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) times an even head "
                "width (rotary positions rotate channel pairs)"
            )
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be positive, got {self.init_std!r}")


@dataclass
class CompressiveLayerCache:
    """What one layer carries from position to position.

    ``memory`` `(batch, <= memory_length, d_model)`, ``compressed`` `(batch, <=
    compressed_memory_length, d_model)`, ``pending`` `(batch, < compression_rate, d_model)`
    (evicted, waiting for a full group), ``segment_inputs`` `(batch, fill, d_model)` (the
    current segment's layer inputs so far), ``segment_keys`` / ``segment_values`` `(batch,
    n_heads, fill, head_dim)` (rotated keys) and ``memory_keys`` / ``memory_values`` `(batch,
    n_heads, slots, head_dim)`: the keys/values of ``[compressed; memory]`` for the current
    segment (None between segments).
    """

    memory: torch.Tensor
    compressed: torch.Tensor
    pending: torch.Tensor
    segment_inputs: torch.Tensor
    segment_keys: torch.Tensor
    segment_values: torch.Tensor
    memory_keys: torch.Tensor | None = None
    memory_values: torch.Tensor | None = None

    @property
    def fill(self) -> int:
        """Positions of the current segment already processed."""
        return self.segment_inputs.shape[1]

    def detach_(self) -> None:
        """Drop every tensor's autograd history (in place)."""
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None:
                setattr(self, item.name, value.detach())


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + head_dim / 2)`` of ``x`` `(batch, n_heads, n, head_dim)`
    by ``positions[t] * base ** (-2i / head_dim)`` (GPT-NeoX layout); ``positions`` `(n,)`."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    angles = positions.to(x.dtype)[:, None] * inv_freq[None, :]  # (n, half)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class MemoryCompression(nn.Module):
    """Compress ``rate`` consecutive memory states into one slot.

    ``(batch, n * rate, d_model)`` -> ``(batch, n, d_model)``: ``max`` or ``mean`` over each
    group, or (``conv``) a learned ``Conv1d(d_model, d_model, kernel=stride=rate)`` initialized
    to mean pooling.
    """

    def __init__(self, d_model: int, rate: int, kind: str) -> None:
        super().__init__()
        self.rate = rate
        self.kind = kind
        if kind == "conv":
            self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mean pooling: ``weight[o, i, k] = (o == i) / rate``, zero bias."""
        if self.kind == "conv":
            d_model = self.conv.in_channels
            eye = torch.eye(d_model, dtype=self.conv.weight.dtype) / self.rate
            self.conv.weight.copy_(eye[:, :, None].expand(-1, -1, self.rate))
            self.conv.bias.zero_()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = states.shape
        if length % self.rate:
            raise ValueError(f"compression needs a multiple of {self.rate} states, got {length}")
        if self.kind == "conv":
            return self.conv(states.transpose(1, 2)).transpose(1, 2)
        groups = states.reshape(batch, length // self.rate, self.rate, d_model)
        return groups.amax(dim=2) if self.kind == "max" else groups.mean(dim=2)


class MemoryAttention(nn.Module):
    """Multi-head causal attention of a segment's positions over ``[compressed memory; memory;
    segment so far]`` with rotary positions by slot index."""

    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.o_proj = nn.Linear(config.d_model, config.d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, n, d_model)` -> `(batch, n_heads, n, head_dim)`."""
        return x.unflatten(-1, (self.config.n_heads, self.config.head_dim)).transpose(1, 2)

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the normalized memory slots `(batch, slots, d_model)`,
        at positions ``0 .. slots - 1``: each `(batch, n_heads, slots, head_dim)`."""
        d_model = self.config.d_model
        key_value = F.linear(memory, self.qkv.weight[d_model:], self.qkv.bias[d_model:])
        k, v = key_value.split(d_model, dim=-1)  # the query rows of qkv are not needed
        positions = torch.arange(memory.shape[1], device=memory.device)
        return apply_rotary(self._heads(k), positions, self.config.rope_base), self._heads(v)

    def forward(self, hidden: torch.Tensor, cache: CompressiveLayerCache) -> torch.Tensor:
        """``hidden`` `(batch, n, d_model)`: normalized inputs at segment positions
        ``fill .. fill + n - 1``; appends their keys/values to ``cache``; returns `(batch, n,
        d_model)`."""
        config = self.config
        q, k, v = (self._heads(t) for t in self.qkv(hidden).split(config.d_model, dim=-1))
        slots, fill, n = cache.memory_keys.shape[2], cache.fill, hidden.shape[1]
        positions = torch.arange(slots + fill, slots + fill + n, device=hidden.device)
        q = apply_rotary(q, positions, config.rope_base)
        cache.segment_keys = torch.cat(
            [cache.segment_keys, apply_rotary(k, positions, config.rope_base)], dim=2
        )
        cache.segment_values = torch.cat([cache.segment_values, v], dim=2)
        keys = torch.cat([cache.memory_keys, cache.segment_keys], dim=2)
        values = torch.cat([cache.memory_values, cache.segment_values], dim=2)
        # Query at slot position p sees every key at position <= p: all memory, the segment
        # up to itself.
        key_positions = torch.arange(keys.shape[2], device=hidden.device)
        visible = key_positions[None, :] <= positions[:, None]  # (n, keys)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(config.head_dim)
        weights = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
        context = (weights @ values).transpose(1, 2).flatten(-2)  # (batch, n, d_model)
        return self.o_proj(context)


class CompressiveBlock(nn.Module):
    """Pre-LayerNorm Transformer block with memories: ``x + attention(ln(x), memories)``,
    then ``+ mlp(ln(.))``; `(batch, length, d_model)` both ways, segment by segment."""

    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__()
        self.config = config
        self.ln_attn = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        self.attention = MemoryAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        width = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, width), nn.GELU(), nn.Linear(width, config.d_model)
        )
        self.compression = MemoryCompression(
            config.d_model, config.compression_rate, config.compression
        )

    def init_cache(self, batch_size: int, device, dtype) -> CompressiveLayerCache:
        config = self.config

        def empty(*shape: int) -> torch.Tensor:
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)

        heads = (config.n_heads, 0, config.head_dim)
        return CompressiveLayerCache(
            memory=empty(0, config.d_model),
            compressed=empty(0, config.d_model),
            pending=empty(0, config.d_model),
            segment_inputs=empty(0, config.d_model),
            segment_keys=empty(*heads),
            segment_values=empty(*heads),
        )

    def forward(self, x: torch.Tensor, cache: CompressiveLayerCache | None = None) -> torch.Tensor:
        """``x`` `(batch, length, d_model)` -> `(batch, length, d_model)`; continues from
        ``cache`` and advances it in place when given (a fresh state otherwise)."""
        state = cache if cache is not None else self.init_cache(x.shape[0], x.device, x.dtype)
        outputs, start = [], 0
        while start < x.shape[1]:
            size = min(self.config.segment_length - state.fill, x.shape[1] - start)
            outputs.append(self._segment_piece(x[:, start : start + size], state))
            start += size
        if cache is not None:
            cache.detach_()
        return torch.cat(outputs, dim=1)

    def _segment_piece(self, x: torch.Tensor, state: CompressiveLayerCache) -> torch.Tensor:
        """Positions ``fill .. fill + n - 1`` of the current segment, ``x`` `(batch, n,
        d_model)`; closes the segment (updates the memories) when it is full."""
        if state.fill == 0:
            memory = torch.cat([state.compressed, state.memory], dim=1)
            keys, values = self.attention.memory_keys_values(self.ln_attn(memory))
            state.memory_keys, state.memory_values = keys, values
        h = x + self.attention(self.ln_attn(x), state)
        out = h + self.mlp(self.ln_mlp(h))
        state.segment_inputs = torch.cat([state.segment_inputs, x], dim=1)
        if state.fill == self.config.segment_length:
            self._close_segment(state)
        return out

    def _close_segment(self, state: CompressiveLayerCache) -> None:
        """Move the finished segment's inputs (detached) into the memory; compress what falls
        out of it into the compressed memory."""
        config = self.config
        memory = torch.cat([state.memory, state.segment_inputs.detach()], dim=1)
        overflow = max(memory.shape[1] - config.memory_length, 0)
        state.memory = memory[:, overflow:]
        pending = torch.cat([state.pending, memory[:, :overflow]], dim=1)
        ready = pending.shape[1] // config.compression_rate * config.compression_rate
        if ready:
            compressed = torch.cat([state.compressed, self.compression(pending[:, :ready])], dim=1)
            keep_from = max(compressed.shape[1] - config.compressed_memory_length, 0)
            state.compressed = compressed[:, keep_from:]
        state.pending = pending[:, ready:]
        empty = state.segment_keys[:, :, :0]
        state.segment_inputs = state.segment_inputs[:, :0]
        state.segment_keys, state.segment_values = empty, empty
        state.memory_keys = state.memory_values = None

    def step(self, x: torch.Tensor, cache: CompressiveLayerCache) -> torch.Tensor:
        """One position: ``x`` `(batch, d_model)` -> `(batch, d_model)`, cache updated."""
        return self(x[:, None], cache)[:, 0]


class CompressiveTransformerLM(CausalLM):
    """Compressive Transformer language model: ``input_ids`` `(batch, length)` -> logits
    `(batch, length, vocab)` (as ``LMOutput.logits``); final norm is a LayerNorm."""

    config: CompressiveConfig

    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__(config)
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        self.layers = nn.ModuleList(CompressiveBlock(config) for _ in range(config.n_layer))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialization: normal(``init_std``) weights, zero biases, residual output
        projections scaled by ``1 / sqrt(2 * n_layer)``; conv compressors as mean pooling."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            layer.attention.o_proj.weight.mul_(1 / math.sqrt(2 * self.config.n_layer))
            layer.mlp[2].weight.mul_(1 / math.sqrt(2 * self.config.n_layer))
            layer.compression.reset_parameters()
