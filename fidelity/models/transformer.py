"""Causal Transformer baseline in the Pythia / GPT-NeoX style.

Each block, for input ``x`` `(batch, length, d_model)`:

- parallel residual (GPT-NeoX, Pythia): ``x + attn(ln_attn(x)) + mlp(ln_mlp(x))``;
- sequential residual: ``h = x + attn(ln_attn(x))``, then ``h + mlp(ln_mlp(h))``.

Attention is multi-head causal self-attention with rotary position embeddings (RoPE, GPT-NeoX
"rotate half" form) on the first ``rotary_pct`` of each head's channels, computed with
``torch.nn.functional.scaled_dot_product_attention``. With ``sliding_window = W`` a query at
position ``t`` sees the keys at positions ``t - W + 1 .. t`` (``W`` keys, itself included).

Long inputs never build a length x length mask: queries are processed in blocks of
``attention_block_size``, and each block's mask spans only the keys it can see (for a sliding
window: ``block + W - 1`` keys). The KV cache keeps every key (full attention) or only the last
``W - 1`` keys (sliding window), so chunk-by-chunk processing of a long input with a window
has memory bounded by the window.

Parameter names are ours; :mod:`fidelity.models.checkpoint` maps Hugging Face
``GPTNeoXForCausalLM`` names onto them (``qkv`` keeps GPT-NeoX's per-head ``[q | k | v]``
layout, so that mapping is a pure rename).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig

ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class TransformerConfig(ModelConfig):
    """Pythia / GPT-NeoX-style causal Transformer (defaults as in GPT-NeoX unless noted)."""

    model_type = "transformer"

    tie_embeddings: bool = False  # GPT-NeoX / Pythia keep a separate output head (embed_out)
    norm_epsilon: float = 1e-5  # epsilon of every LayerNorm (GPT-NeoX default)
    n_heads: int = 4  # attention heads; head width d_model / n_heads
    d_mlp: int = 0  # MLP hidden width; 0 means 4 * d_model (GPT-NeoX)
    activation: str = "gelu"  # MLP nonlinearity: exact erf GELU (GPT-NeoX); "gelu_tanh" approx.
    rotary_pct: float = 0.25  # share of each head's channels rotated by RoPE (Pythia: 0.25)
    rotary_base: float = 10000.0  # RoPE base (GPT-NeoX default)
    use_parallel_residual: bool = True  # attention and MLP both read x (GPT-NeoX, Pythia)
    sliding_window: int | None = None  # keys a query sees, itself included; None: all earlier
    attention_bias: bool = True  # biases on the qkv and output projections (GPT-NeoX)
    mlp_bias: bool = True  # biases on both MLP projections (GPT-NeoX)
    attention_block_size: int = 1024  # queries per attention block on long inputs (memory only)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (GPT-NeoX: ``int(head_dim * rotary_pct)``)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def resolved_d_mlp(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def validate(self) -> None:
        super().validate()
        for name in ("n_heads", "attention_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not isinstance(self.d_mlp, int) or self.d_mlp < 0:
            raise ValueError(
                f"d_mlp must be a non-negative integer (0: 4 * d_model), got {self.d_mlp!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must lie in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_dim % 2:
            raise ValueError(
                f"rotary_pct * head_dim must give an even number of rotated channels; "
                f"int({self.rotary_pct} * {self.head_dim}) = {self.rotary_dim}"
            )
        if not self.rotary_base > 0:
            raise ValueError(f"rotary_base must be positive, got {self.rotary_base!r}")
        window = self.sliding_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(
                f"sliding_window must be None (full causal attention) or a positive integer, "
                f"got {window!r}"
            )


@dataclass
class TransformerLayerCache:
    """KV cache of one attention layer: ``keys`` and ``values`` `(batch, n_heads, n_cached,
    head_dim)`, keys already rotated; the cached positions immediately precede the next input."""

    keys: torch.Tensor
    values: torch.Tensor


def rotary_angles(
    start: int, length: int, rotary_dim: int, base: float, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines for positions ``start .. start + length - 1``: two `(length,
    rotary_dim)` tensors (angles computed in float64 for float64 models, else float32)."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, rotary_dim, 2, device=device).to(angle_dtype) / rotary_dim
    inv_freq = 1.0 / (base**exponents)  # (rotary_dim / 2,)
    positions = torch.arange(start, start + length, device=device).to(angle_dtype)
    freqs = positions[:, None] * inv_freq  # (length, rotary_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (length, rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` `(batch, heads, length, head_dim)`
    ("rotate half" convention); ``cos``, ``sin`` `(length, rotary_dim)`."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passed], dim=-1)


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention where the queries are the last positions.

    ``query`` `(batch, heads, n_queries, head_dim)`; ``key``, ``value`` `(batch, heads, n_keys,
    head_dim)` with ``n_keys >= n_queries``: query ``i`` sits at key index
    ``n_keys - n_queries + i`` and sees key ``j`` when ``j <= that index`` and, with a window
    ``W``, ``j > that index - W``. Returns `(batch, heads, n_queries, head_dim)`.

    Queries go in blocks of ``block_size``; each block's boolean mask covers only the keys it can
    see, so memory is O(block_size * visible keys), never n_keys x n_keys.
    """
    n_queries, n_keys = query.shape[-2], key.shape[-2]
    n_past = n_keys - n_queries
    if n_past < 0:
        raise ValueError(f"need at least as many keys ({n_keys}) as queries ({n_queries})")
    full_view = window is None or window >= n_keys
    if n_past == 0 and full_view and n_queries <= block_size:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)
    outputs = []
    for begin in range(0, n_queries, block_size):
        end = min(begin + block_size, n_queries)
        key_end = n_past + end  # keys after the block's last query are never visible
        key_begin = 0 if window is None else max(0, n_past + begin - window + 1)
        query_index = torch.arange(n_past + begin, n_past + end, device=query.device)[:, None]
        key_index = torch.arange(key_begin, key_end, device=query.device)[None, :]
        visible = key_index <= query_index  # (block, block keys)
        if window is not None:
            visible &= key_index > query_index - window
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, begin:end],
                key[:, :, key_begin:key_end],
                value[:, :, key_begin:key_end],
                attn_mask=visible,
            )
        )
    return torch.cat(outputs, dim=2)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE: `(batch, length, d_model)` both ways.

    ``qkv`` produces, per head, ``[query | key | value]`` (GPT-NeoX's fused layout).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.attention_bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.attention_bias)

    def forward(
        self, x: torch.Tensor, cache: TransformerLayerCache | None = None, start: int = 0
    ) -> torch.Tensor:
        """``x`` `(batch, length, d_model)` at positions ``start ..``; with ``cache`` the keys
        of earlier positions come from it and it is advanced in place."""
        config = self.config
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, config.n_heads, 3 * config.head_dim)
        query, key, value = qkv.transpose(1, 2).chunk(3, dim=-1)  # (batch, heads, length, hd)
        if config.rotary_dim:
            cos, sin = rotary_angles(
                start, length, config.rotary_dim, config.rotary_base, x.dtype, x.device
            )
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if cache is not None:
            key = torch.cat([cache.keys.to(key.dtype), key], dim=2)
            value = torch.cat([cache.values.to(value.dtype), value], dim=2)
            n_keys = key.shape[2]
            window = config.sliding_window
            first_kept = 0 if window is None else max(0, n_keys - (window - 1))
            cache.keys = key[:, :, first_kept:].to(cache.keys.dtype)
            cache.values = value[:, :, first_kept:].to(cache.values.dtype)
        out = causal_attention(
            query, key, value, config.sliding_window, config.attention_block_size
        )  # (batch, heads, length, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, config.d_model))

    def init_cache(self, batch_size: int, device, dtype) -> TransformerLayerCache:
        config = self.config
        shape = (batch_size, config.n_heads, 0, config.head_dim)
        return TransformerLayerCache(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
        )


class MLP(nn.Module):
    """``fc_out(act(fc_in(x)))``: `(..., d_model)` -> `(..., d_model)`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.resolved_d_mlp, bias=config.mlp_bias)
        self.fc_out = nn.Linear(config.resolved_d_mlp, config.d_model, bias=config.mlp_bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block, parallel or sequential residual; `(batch, length, d_model)`
    both ways."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.ln_attn = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        self.ln_mlp = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        self.attention = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: TransformerLayerCache | None = None, start: int = 0
    ) -> torch.Tensor:
        attended = self.attention(self.ln_attn(x), cache, start)
        if self.use_parallel_residual:
            return self.mlp(self.ln_mlp(x)) + attended + x
        h = attended + x
        return self.mlp(self.ln_mlp(h)) + h

    def init_cache(self, batch_size: int, device, dtype) -> TransformerLayerCache:
        return self.attention.init_cache(batch_size, device, dtype)


def init_transformer_weights(model: CausalLM) -> None:
    """GPT-NeoX-style initialization: normal(0.02) embeddings and linear weights, zero biases,
    and the projections that write into the residual stream (``out_proj``, ``fc_out``) scaled
    by ``1 / sqrt(2 * n_layer)`` (GPT-2's residual scaling)."""
    scale = 1.0 / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 * scale if name.endswith(("out_proj", "fc_out")) else 0.02
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class TransformerLM(CausalLM):
    """Causal Transformer language model: ``input_ids`` `(batch, length)` -> logits `(batch,
    length, vocab)` (as ``LMOutput.logits``); final LayerNorm, untied head by default."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_epsilon)
        init_transformer_weights(self)

    def _forward_blocks(self, x, cache, hidden):
        start = cache.position if cache is not None else 0
        for index, layer in enumerate(self.layers):
            x = layer(x, cache.layers[index] if cache is not None else None, start)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.position += x.shape[1]
        return x

    def _step_blocks(self, x, cache):
        return self._forward_blocks(x[:, None], cache, None)[:, 0]
