"""The result of a capture: hidden states of chosen layers at chosen positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Capture:
    """Hidden states kept by :func:`fidelity.capture`.

    ``positions`` `(n_positions,)` are the sorted, unique sequence positions that were kept;
    ``states[layer]`` is `(batch, n_positions, d_model)`: the residual stream after block
    ``layer`` at those positions (layer 0 is the token embeddings, layer ``n_layers`` the output
    of the last block before the final norm). ``tokens`` `(batch, n_positions)` are the input
    token ids at the kept positions. ``length`` is the full sequence length. ``internals``
    holds model-specific observations (e.g. MemMamba pool writes), keyed by name.

    Models that drop rows (DeciMamba's decimation) leave NaN in ``states[layer]`` at the
    positions absent from that layer: NaN means "this token is not in this layer", and the
    metrics skip such samples (see :meth:`present`).
    """

    positions: torch.Tensor
    states: dict[int, torch.Tensor]
    tokens: torch.Tensor
    length: int
    internals: dict[str, object] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        """The captured layer indices, ascending."""
        return sorted(self.states)

    def __getitem__(self, layer: int) -> torch.Tensor:
        """Return `(batch, n_positions, d_model)` states of ``layer``."""
        if layer not in self.states:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.states[layer]

    def present(self, layer: int) -> torch.Tensor:
        """`(batch, n_positions)` bool: which kept positions exist in ``layer``."""
        return ~torch.isnan(self[layer]).any(dim=-1)

    def __contains__(self, layer: object) -> bool:
        return layer in self.states

    def index_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Map sequence ``positions`` (any shape) to indices into the kept positions.

        Raises ``KeyError`` if any requested position was not kept.
        """
        positions = torch.as_tensor(positions, dtype=torch.long)
        index = torch.searchsorted(self.positions, positions)
        index = index.clamp(max=len(self.positions) - 1)
        if not torch.equal(self.positions[index], positions):
            missing = positions[self.positions[index] != positions]
            raise KeyError(f"positions not kept by this capture: {missing[:10].tolist()}")
        return index

    def at(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """States of ``layer`` at sequence ``positions`` `(n,)` -> `(batch, n, d_model)`."""
        return self[layer][:, self.index_of(positions)]
