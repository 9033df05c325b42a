"""The result of a capture: hidden states of chosen layers at chosen positions.

Index convention (the README's glossary): a **layer** is an index into the residual stream,
layer 0 the token embeddings and layer ``l`` the output of block ``l - 1``; a **block** is a
model's residual block, 0-based (``model.layers[i]``). :func:`layer_after` and
:func:`block_before` are the only places that convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def layer_after(block: int) -> int:
    """The layer block ``block`` (0-based) writes: ``block + 1``."""
    return block + 1


def block_before(layer: int) -> int:
    """The block whose output is ``layer`` (>= 1): ``layer - 1``."""
    if layer < 1:
        raise ValueError(f"layer {layer} is the embeddings, the output of no block")
    return layer - 1


@dataclass
class Capture:
    """Hidden states kept by :func:`fidelity.capture`.

    ``positions`` `(n_positions,)` are the sorted, unique sequence positions that were kept;
    ``states[layer]`` is `(batch, n_positions, d_model)`: the residual stream at ``layer`` at
    those positions (layer 0 is the token embeddings, layer ``l`` the output of block ``l - 1``,
    layer ``n_blocks`` the output of the last block before the final norm; see
    :meth:`block_output`). ``tokens`` `(batch, n_positions)` are the input
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

    def block_output(self, block: int) -> torch.Tensor:
        """`(batch, n_positions, d_model)` output of block ``block`` (0-based): layer
        ``block + 1`` (as TransformerLens's ``blocks.{i}.hook_resid_post``)."""
        return self[layer_after(block)]

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
