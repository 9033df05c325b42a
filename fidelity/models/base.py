"""What every language model of the toolkit shares: RMSNorm, the output type, the LM shell.

A model is an embedding, a stack of residual blocks (``model.layers``), a final norm and an LM
head. The residual stream after block ``i`` is what :func:`fidelity.capture` calls layer
``i + 1`` (layer 0 is the embedding output), so forward hooks on ``model.embedding`` and on
each ``model.layers[i]`` observe exactly those tensors.

Every model offers three ways to run a sequence that give the same logits (tested):
``model(input_ids)`` (parallel over the sequence), ``model(chunk, cache=cache)`` chunk after
chunk (the cache carries every state forward, so memory does not grow with the length), and
``model.step(tokens, cache)`` one token at a time (O(1) per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.kernels.conv import depthwise_conv1d
from fidelity.models.config import ModelConfig

AUTO_CHUNK_SIZE = 8192
"""Inputs longer than this are fed to a chunkable model in chunks of it ("auto")."""


class RMSNorm(nn.Module):
    """Root-mean-square norm (mamba_ssm / Hugging Face Mamba convention), computed in float32.

    ``(..., d)`` -> ``(..., d)``.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(normed.dtype)).to(dtype)


@dataclass
class LMOutput:
    """Output of every model's forward.

    ``logits`` `(batch, length, vocab)`; ``hidden_states`` (when asked for) is a tuple of
    ``n_layer + 1`` tensors `(batch, length, d_model)`: the embedding output and the residual
    stream after each block, before the final norm. ``aux_loss`` is a scalar regularizer the
    model asks training to add to its loss (MemMamba's write-rate term), None for most models.
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class ModelCache:
    """Recurrent state of a whole model: one entry per block in ``layers`` (each block's own
    cache type), and ``position``, the number of tokens consumed so far."""

    layers: list[Any]
    position: int = 0


class CausalLM(nn.Module):
    """Embedding -> ``layers`` -> final RMSNorm -> LM head; subclasses build the blocks.

    By default every block provides ``forward(x, layer_cache | None)``, ``step(x,
    layer_cache)`` and ``init_cache(batch_size, device, dtype)``; subclasses whose blocks need
    more (positions, other layers' state) override :meth:`_forward_blocks` /
    :meth:`_step_blocks`.
    """

    config: ModelConfig

    # -- run policy: how metrics may run the model (DeciMamba overrides it) ----------------
    causal: bool = True
    """Whether position ``t``'s outputs depend on tokens ``<= t`` only."""
    chunkable: bool = True
    """Whether feeding a sequence chunk by chunk through the cache gives the one-call result."""
    all_positions: bool = True
    """Whether a forward returns logits at every input position."""

    def auto_chunk_size(self, length: int | None = None) -> int | None:
        """Chunk length for ``chunk_size="auto"``: :data:`AUTO_CHUNK_SIZE` for a chunkable
        model (None, one call, when ``length`` is given and no longer), else None."""
        if not self.chunkable or (length is not None and length <= AUTO_CHUNK_SIZE):
            return None
        return AUTO_CHUNK_SIZE

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList()
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def init_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype=None
    ) -> ModelCache:
        """An empty recurrent state for ``batch_size`` sequences (the model's device and dtype
        unless given)."""
        device = device or self.device
        dtype = dtype or self.embedding.weight.dtype
        return ModelCache([layer.init_cache(batch_size, device, dtype) for layer in self.layers])

    def _forward_blocks(
        self, x: torch.Tensor, cache: ModelCache | None, hidden: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """Run every block over ``x`` `(batch, length, d_model)`; append block outputs to
        ``hidden`` when given; advance ``cache`` in place when given."""
        for index, layer in enumerate(self.layers):
            x = layer(x, cache.layers[index] if cache is not None else None)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.position += x.shape[1]
        return x

    def _step_blocks(self, x: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Run every block for one position, ``x`` `(batch, d_model)`, updating ``cache``."""
        for index, layer in enumerate(self.layers):
            x = layer.step(x, cache.layers[index])
        cache.position += 1
        return x

    # -- shared ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any | None = None,
        output_hidden_states: bool = False,
    ) -> LMOutput:
        """Logits for ``input_ids`` `(batch, length)` -> ``LMOutput`` (logits `(batch, length,
        vocab)`).

        With ``cache`` (from :meth:`init_cache`), the sequence continues from the cached state
        and the cache is advanced in place, so a long input can be fed chunk by chunk.
        """
        input_ids = self._check_input_ids(input_ids)
        x = self.embedding(input_ids)
        hidden = [x] if output_hidden_states else None
        x = self._forward_blocks(x, cache, hidden)
        logits = self.lm_head(self.norm_f(x))
        logits = logits[..., : self.config.vocab_size]
        return LMOutput(logits=logits, hidden_states=tuple(hidden) if hidden else None)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """One recurrent step: ``tokens`` `(batch,)` -> logits `(batch, vocab)`; O(1) per token."""
        if tokens.dim() != 1:
            raise ValueError(f"step() takes tokens of shape (batch,), got {tuple(tokens.shape)}")
        tokens = self._check_input_ids(tokens[:, None])[:, 0]
        x = self._step_blocks(self.embedding(tokens), cache)
        return self.lm_head(self.norm_f(x))[..., : self.config.vocab_size]

    def _check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        return input_ids.long()


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """``y`` such that ``softplus(y) == x`` (for dt_proj bias initialization)."""
    return x + torch.log(-torch.expm1(-x))


def conv_window(window: torch.Tensor, conv_input: torch.Tensor) -> torch.Tensor:
    """The convolution's next window `(batch, channels, width - 1)`: the last ``width - 1``
    inputs of ``window`` followed by ``conv_input`` `(batch, channels, length)`."""
    keep = window.shape[-1]
    recent = conv_input[..., max(0, conv_input.shape[-1] - keep) :].to(window.dtype)
    return torch.cat([window, recent], dim=-1)[..., -keep:] if keep else window


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise causal convolution.

    ``x`` `(batch, channels, length)`, ``weight`` `(channels, 1, width)`, ``prefix``
    `(batch, channels, width - 1)`: the inputs before ``x`` (zeros at the sequence start).
    Returns `(batch, channels, length)`.
    """
    width = weight.shape[-1]
    if prefix is None:
        padded = F.pad(x, (width - 1, 0))
    else:
        padded = torch.cat([prefix.to(x.dtype), x], dim=-1)
    return depthwise_conv1d(padded, weight, bias)
