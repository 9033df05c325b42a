"""Switch MemMamba's memory path off from outside: every pool context zeroed.

:func:`zeroed_memory_contexts` puts forward hooks on each block's ``cross_token`` and
``cross_layer`` attention that replace their output `(batch, n_segments, n_queries,
summary_dim)` (the context before the output projection, which has no bias) with zeros, so the
contexts fused into the residual stream are zero and every block's output is its mixer's,
``x + mixer(norm(x))``, whatever the fusion (``weighted``, ``residual`` and ``gated`` all add a
multiple of the projected context). Notes are still written and pools still kept (the
pools only feed the zeroed attentions). No weight is touched; the hooks are removed when the
block exits, also on an error (as TransformerLens' hook contexts do). Works for one-pass,
chunked and ``step()`` forwards alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from fidelity.models.memmamba import MemMambaLM, PoolAttentionOutput


def _zero_output(_module, _args, output: PoolAttentionOutput) -> PoolAttentionOutput:
    return dataclasses.replace(output, output=torch.zeros_like(output.output))


@contextlib.contextmanager
def zeroed_memory_contexts(model: MemMambaLM) -> Iterator[int]:
    """Inside the block, ``model`` runs with every cross-token and cross-layer context zeroed;
    yields the number of attentions zeroed (0 when the config disables both)."""
    if not isinstance(model, MemMambaLM):
        raise TypeError(f"zeroed_memory_contexts needs a MemMambaLM, got {type(model).__name__}")
    handles = []
    try:
        for block in model.layers:
            for attention in (block.cross_token, block.cross_layer):
                if attention is not None:
                    handles.append(attention.register_forward_hook(_zero_output))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
