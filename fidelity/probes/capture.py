"""Forward hooks that keep chosen layers' hidden states at chosen positions, and nothing more.

Layer numbering (see :mod:`fidelity.probes.capture_types`): layer 0 is the input of the first
block (the token embeddings, plus position embeddings for GPT-2-style models); layer ``l`` is
the output of block ``l - 1`` (the residual stream; blocks are 0-based). Where the blocks live
is looked up in a small table (our models, Hugging Face ``MambaForCausalLM``,
``Mamba2ForCausalLM``, ``GPTNeoXForCausalLM``, GPT-2-style models) or given explicitly as module
names for any other ``nn.Module``.

Each hook slices the requested positions out of its block's output as soon as the block has run
and stores only those (optionally in a smaller dtype), so a 60k-token pass over 24 layers keeps
``n_positions x d_model`` per layer instead of every layer at every position. With
``chunk_size``, our models are fed chunk by chunk with a recurrent cache, so the activations of
the forward itself stay bounded too.

Models whose blocks drop rows (DeciMamba: a decimating block returns only the rows it keeps) are
followed row by row: each chunk enters the first block as consecutive positions, and every
``TokenDecimation`` submodule's kept row indices map the rows of the blocks after it back to
their original positions. A requested position that an earlier decimation dropped is stored as
NaN in that layer: **NaN means "this token is not in this layer"** (the metrics treat such
samples as absent). The non-finite check looks at the blocks' real outputs only, so a NaN or Inf
that a model computes is still reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.models.base import CausalLM
from fidelity.models.decimamba import KeptPositions, TokenDecimation
from fidelity.models.memmamba import MemMambaLM
from fidelity.probes.capture_types import Capture, layer_after
from fidelity.probes.memmamba_trace import tracing_memmamba

LayerSelection = None | int | Sequence[int] | Callable[[int], bool]

# (attribute path of the blocks, class-name fragment) for models we know by their layout.
BLOCK_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("backbone.layers", "Mamba"),  # Hugging Face MambaForCausalLM / Mamba2ForCausalLM
    ("gpt_neox.layers", "GPTNeoX"),  # Hugging Face GPTNeoXForCausalLM (Pythia)
    ("transformer.h", "GPT2"),  # Hugging Face GPT-2 style
    ("model.layers", ""),  # Llama-style Hugging Face models
)


class NonFiniteHiddenStateError(InputError):
    """A hidden state held NaN or Inf; ``layer`` and ``position`` say where it first appeared.

    An input error: the model's weights (or the input) produce it, not the toolkit's code."""

    def __init__(self, layer: int, position: int, row: int) -> None:
        super().__init__(
            f"non-finite hidden state (NaN or Inf) at layer {layer}, position {position} "
            f"(batch row {row}); the model's weights or inputs hold NaN/Inf or overflow"
        )
        self.layer = layer
        self.position = position
        self.row = row


def find_blocks(model: nn.Module, module_names: Sequence[str] | None = None) -> list[nn.Module]:
    """The residual blocks of ``model`` in order (see the module docstring for the lookup)."""
    if module_names is not None:
        modules = dict(model.named_modules())
        missing = [name for name in module_names if name not in modules]
        if missing:
            raise InputError(f"modules not found in the model: {missing}")
        return [modules[name] for name in module_names]
    if isinstance(model, CausalLM):
        return list(model.layers)
    class_name = type(model).__name__
    for path, fragment in BLOCK_LOCATIONS:
        blocks = _attribute(model, path)
        if isinstance(blocks, nn.ModuleList) and fragment in class_name:
            return list(blocks)
    raise InputError(
        f"cannot find the blocks of a {class_name}; pass module_names=[...] with the names of "
        "its residual blocks in order (see model.named_modules())"
    )


def _attribute(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def resolve_layers(selection: LayerSelection, n_blocks: int) -> list[int]:
    """Layer indices in ``[0, n_blocks]`` picked by ``selection`` (None means all)."""
    every = list(range(n_blocks + 1))
    if selection is None:
        return every
    if callable(selection):
        return [layer for layer in every if selection(layer)]
    if isinstance(selection, int):
        selection = [selection]
    layers = sorted({int(layer) for layer in selection})
    bad = [layer for layer in layers if not 0 <= layer <= n_blocks]
    if bad:
        raise InputError(
            f"layer indices {bad} out of range: this model has layers 0..{n_blocks} "
            "(0 = embeddings, l = output of block l - 1)"
        )
    return layers


def _as_positions(positions: torch.Tensor | Sequence[int] | None, length: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(length)
    positions = torch.as_tensor(positions, dtype=torch.long).flatten().unique(sorted=True)
    if len(positions) and (positions[0] < 0 or positions[-1] >= length):
        raise InputError(
            f"positions must lie in [0, {length}); got range "
            f"[{int(positions[0])}, {int(positions[-1])}]"
        )
    return positions


@dataclass
class _Recorder:
    """Collects the kept rows of every hooked layer as chunks go by.

    Without ``kept_positions`` a layer's rows are consecutive positions; with it (models whose
    blocks drop rows) they are the positions it tracks, and requested positions missing from
    a layer are stored as NaN.
    """

    layers: list[int]
    positions: torch.Tensor
    dtype: torch.dtype | None
    check_finite: bool
    kept_positions: KeptPositions | None = None
    offsets: dict[int, int] = field(default_factory=dict)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def consumed(self) -> int:
        """Tokens seen so far."""
        if self.kept_positions is not None:
            return self.kept_positions.consumed
        return max(self.offsets.values(), default=0)

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        """Keep the requested rows of ``hidden`` `(batch, rows, d_model)` for ``layer``."""
        if self.kept_positions is not None:
            self._record_tracked(layer, hidden, self.kept_positions)
            return
        start = self.offsets.get(layer, 0)
        end = start + hidden.shape[1]
        self.offsets[layer] = end
        if self.check_finite and (first := _first_non_finite(hidden)) is not None:
            row, index = first
            raise NonFiniteHiddenStateError(layer, start + index, row)
        lo, hi = torch.searchsorted(self.positions, torch.tensor([start, end])).tolist()
        buffer = self._buffer(layer, hidden)
        if hi > lo:
            buffer[:, lo:hi] = hidden[:, self.positions[lo:hi].to(hidden.device) - start]

    def _record_tracked(self, layer: int, hidden: torch.Tensor, tracked: KeptPositions) -> None:
        """Rows of ``hidden`` `(batch, n_rows, d_model)` sit at ``tracked.positions``;
        requested positions of the current chunk that are not among them become NaN rows."""
        rows = tracked.positions
        if rows is None or rows.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"layer {layer} returned {tuple(hidden.shape[:2])} (batch, rows) but the capture "
                f"tracked {None if rows is None else tuple(rows.shape)} row positions; a block "
                "dropped rows without its decimation submodule being called"
            )
        if self.check_finite and (first := _first_non_finite(hidden)) is not None:
            row, index = first
            raise NonFiniteHiddenStateError(layer, int(rows[row, index]), row)
        lo, hi = torch.searchsorted(
            self.positions, torch.tensor([tracked.start, tracked.consumed])
        ).tolist()
        buffer = self._buffer(layer, hidden)
        if hi == lo:
            return
        batch, n_rows, d_model = hidden.shape
        wanted = self.positions[lo:hi].to(rows.device).expand(batch, -1).contiguous()
        index = torch.searchsorted(rows.contiguous(), wanted).clamp(max=n_rows - 1)  # (b, n_w)
        present = (rows.gather(1, index) == wanted).cpu()  # (batch, n_wanted)
        kept = hidden.gather(1, index[..., None].expand(-1, -1, d_model))
        buffer[:, lo:hi] = kept
        buffer[:, lo:hi][~present] = torch.nan  # this position is not in this layer

    def _buffer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's `(batch, n_positions, d_model)` CPU store, allocated once (NaN-filled)
        in the storage dtype, so kept rows are written in place and never concatenated."""
        if layer not in self.buffers:
            batch, _, d_model = hidden.shape
            self.buffers[layer] = torch.full(
                (batch, len(self.positions), d_model),
                torch.nan,
                dtype=self.dtype or hidden.dtype,
            )
        return self.buffers[layer]

    def states(self) -> dict[int, torch.Tensor]:
        return {layer: self.buffers[layer] for layer in self.layers}


def _first_non_finite(hidden: torch.Tensor) -> tuple[int, int] | None:
    """``(batch row, row index)`` of the first NaN/Inf in ``hidden`` `(batch, rows, d_model)`,
    or None when every value is finite."""
    # a NaN or an Inf anywhere makes the sum NaN or Inf: a finite sum (one pass, no mask)
    # clears them all; finite values whose sum overflows are looked at one by one below
    if bool(torch.isfinite(hidden.sum())):
        return None
    finite = torch.isfinite(hidden).all(dim=-1)  # (batch, rows)
    if bool(finite.all()):
        return None
    row, index = (~finite).nonzero()[0].tolist()
    return row, index


def _track_dropped_rows(blocks: list[nn.Module], recorder: _Recorder, handles: list) -> None:
    """For blocks with a ``TokenDecimation`` submodule (DeciMamba), follow row positions:
    a pre-hook on the first block starts each chunk, a hook on each decimation applies it."""
    decimations = [getattr(block, "decimation", None) for block in blocks]
    decimations = [module for module in decimations if isinstance(module, TokenDecimation)]
    if not decimations:
        return
    tracked = recorder.kept_positions = KeptPositions()

    def start_chunk(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _first_tensor(args, kwargs)  # (batch, chunk, d_model)
        tracked.start_chunk(hidden.shape[0], hidden.shape[1], hidden.device)

    handles.append(blocks[0].register_forward_pre_hook(start_chunk, with_kwargs=True))
    for module in decimations:
        handles.append(
            module.register_forward_hook(lambda _module, _args, output: tracked.keep(output.index))
        )


def _output_tensor(output: object) -> torch.Tensor:
    """A block's hidden-state output, whether returned bare or first in a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot read hidden states from a block output of type {type(output)}")


@contextlib.contextmanager
def capturing(
    model: nn.Module,
    length: int,
    layers: LayerSelection = None,
    positions: torch.Tensor | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    *,
    module_names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> Iterator[Capture]:
    """Context-manager form of :func:`capture`, for a forward loop of your own.

    Inside the block, run ``model`` over one sequence of ``length`` tokens (in one call, or in
    consecutive chunks that continue each other); the yielded :class:`Capture` is filled in
    when the block exits (its ``tokens`` stay empty: you hold the input). Hooks are removed on
    exit, also when the loop raises. ``step()`` calls are not observed (they bypass the blocks'
    forward).
    """
    blocks = find_blocks(model, module_names)
    chosen = resolve_layers(layers, len(blocks))
    kept = _as_positions(positions, length)
    recorder = _Recorder(chosen, kept, dtype, check_finite)
    handles = []
    try:
        _track_dropped_rows(blocks, recorder, handles)  # before layer 0's hook: it starts chunks
        if 0 in chosen:
            handles.append(
                blocks[0].register_forward_pre_hook(
                    lambda _module, args, kwargs: recorder.record(0, _first_tensor(args, kwargs)),
                    with_kwargs=True,
                )
            )
        for index, block in enumerate(blocks):
            layer = layer_after(index)
            if layer in chosen:
                handles.append(
                    block.register_forward_hook(
                        lambda _module, _args, output, layer=layer: recorder.record(
                            layer, _output_tensor(output)
                        )
                    )
                )
        result = Capture(
            positions=kept, states={}, tokens=torch.empty(0, dtype=torch.long), length=length
        )
        yield result
        consumed = recorder.consumed
        if consumed != length:
            raise InputError(
                f"the capture expected one sequence of {length} tokens but the model consumed "
                f"{consumed}"
            )
        result.states = recorder.states()
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return value
    raise TypeError("cannot find the hidden-state input of the first block")


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: LayerSelection = None,
    positions: torch.Tensor | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    *,
    chunk_size: int | None = None,
    module_names: Sequence[str] | None = None,
    check_finite: bool = True,
    internals: bool = False,
    attention_positions: Sequence[int] | torch.Tensor = (),
    progress: Callable[[int, int], None] | None = None,
) -> Capture:
    """Run ``model`` on ``input_ids`` `(batch, length)` and keep hidden states.

    Returns a :class:`Capture` whose ``cap[layer]`` is `(batch, n_positions, d_model)` at the
    sorted unique ``positions`` (default: all) for each selected layer (``layers``: None for all,
    an int, a list, or a predicate on the layer index). ``dtype`` (e.g. ``torch.float16``)
    stores the kept states in a smaller type. ``chunk_size`` feeds our models chunk by chunk
    through their recurrent cache, bounding the forward's own memory; ``progress(done, total)``
    is called after each chunk. Raises :class:`NonFiniteHiddenStateError` with the layer and
    position of the first NaN/Inf a block outputs when ``check_finite``.

    DeciMamba (blocks that drop rows): ``cap[layer][b, i]`` is the state of the row whose
    original position is ``cap.positions[i]``, and all NaN where an earlier decimation dropped
    that position in sequence ``b`` (NaN = "this token is not in this layer"; the non-finite
    check is not triggered by it). With ``chunk_size`` each chunk is decimated on its own, as
    the model does when fed in chunks. With ``internals`` and a MemMamba
    model, ``cap.internals["memmamba"]`` is a
    :class:`~fidelity.probes.memmamba_trace.MemMambaTrace` (note writes, pool contents, where
    cross-token attention fired, and attention weights at ``attention_positions``). Hooks are
    always removed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            "input_ids must be a torch.Tensor of token ids shaped (batch, length), e.g. "
            f"torch.tensor([[1, 2, 3]]); got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    length = input_ids.shape[1]
    device = _model_device(model)
    if chunk_size is not None and not isinstance(model, CausalLM):
        raise InputError("chunk_size needs one of our models (they carry a recurrent cache)")
    with contextlib.ExitStack() as stack:
        result = stack.enter_context(
            capturing(
                model,
                length,
                layers,
                positions,
                dtype,
                module_names=module_names,
                check_finite=check_finite,
            )
        )
        if internals and isinstance(model, MemMambaLM):
            result.internals["memmamba"] = stack.enter_context(
                tracing_memmamba(model, tuple(input_ids.shape), attention_positions)
            )
        if chunk_size is None:
            model(input_ids.to(device))
            if progress is not None:
                progress(length, length)
        else:
            cache = model.init_cache(input_ids.shape[0])
            for start in range(0, length, chunk_size):
                model(input_ids[:, start : start + chunk_size].to(device), cache=cache)
                if progress is not None:
                    progress(min(start + chunk_size, length), length)
    result.tokens = input_ids[:, result.positions].cpu()
    return result


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def run_with_capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: LayerSelection = None,
    positions: torch.Tensor | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    *,
    module_names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, Capture]:
    """Like TransformerLens' ``run_with_cache``: ``(logits (batch, length, vocab), Capture)``
    from one forward pass over ``input_ids`` `(batch, length)`; ``layers``, ``positions``,
    ``dtype``, ``module_names`` and ``check_finite`` as for :func:`capture` (no chunking,
    internals or progress: use :func:`capture` for those). DeciMamba's logits cover only the
    positions that survive decimation: ``(batch, n_out, vocab)``, at
    ``model(input_ids).positions``."""
    length = input_ids.shape[1]
    options = {"module_names": module_names, "check_finite": check_finite}
    with (
        torch.no_grad(),
        capturing(model, length, layers, positions, dtype, **options) as result,
    ):
        output = model(input_ids.to(_model_device(model)))
    result.tokens = input_ids[:, result.positions].cpu()
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return logits, result
