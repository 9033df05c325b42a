"""Initial recurrent states for training: zeros, the previous batch's final states, or noise.

Buitrago Ruiz and Gu (2025, arXiv 2507.02782) trace recurrent models' failure past their
training length to initial states: trained only from the zero state, a model never sees the
states that long contexts reach. Their remedies, offered by ``fidelity train
--state-passing``:

- ``"carry"`` (state passing): every row starts from the final state of the same row of the
  previous batch (detached: no gradient crosses batches); the first batch starts from zeros.
- ``"noise"`` (fitted noise): every row starts from Gaussian noise with the elementwise mean
  and standard deviation of the previous batch's final states (over its rows); the first
  batch starts from zeros.
- ``"off"``: every row starts from zeros (ordinary training).

Only models whose recurrent state is a fixed-size tensor per layer qualify (:data:`MODELS`:
Mamba and Mamba-2, whose layer caches hold ``conv`` and ``ssm``); MemMamba's cache also
holds its note pool, which must never leak between unrelated sequences.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from fidelity.models.base import CausalLM, ModelCache

MODES = ("off", "carry", "noise")
MODELS = ("mamba", "mamba2")


def final_states(cache: ModelCache) -> list[dict[str, torch.Tensor]]:
    """The states a forward left in ``cache``, detached: one ``{field: tensor}`` per layer
    (``conv`` `(batch, channels, d_conv - 1)`, ``ssm`` `(batch, ...)`)."""
    return [
        {field.name: getattr(layer, field.name).detach() for field in fields(layer)}
        for layer in cache.layers
    ]


def initial_cache(
    model: CausalLM,
    mode: str,
    previous: list[dict[str, torch.Tensor]] | None,
    batch_size: int,
    generator: torch.Generator,
) -> ModelCache | None:
    """The cache a training step starts from under ``mode`` (see the module docstring), or
    None for ``"off"`` (the model's own zero start). ``previous``: :func:`final_states` of the
    last step (None at the first); ``generator`` draws the noise."""
    if mode == "off":
        return None
    parameter = next(model.parameters())
    cache = model.init_cache(batch_size, parameter.device, parameter.dtype)
    if previous is None:
        return cache
    for layer, states in zip(cache.layers, previous, strict=True):
        for name, state in states.items():
            if mode == "carry":
                value = state
            else:
                mean, std = state.mean(dim=0), state.std(dim=0, unbiased=False)
                noise = torch.randn(
                    (batch_size, *mean.shape), generator=generator, dtype=mean.dtype
                ).to(mean.device)
                value = mean + std * noise
            setattr(layer, name, value.clone())
    return cache
