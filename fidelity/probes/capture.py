"""Forward hooks that keep chosen layers' hidden states at chosen positions, and nothing more.

Layer numbering: layer 0 is the input of the first block (the token embeddings, plus position
embeddings for GPT-2-style models); layer ``i + 1`` is the output of block ``i`` (the residual
stream). Where the blocks live is looked up in a small table (our models, Hugging Face
``MambaForCausalLM``, ``Mamba2ForCausalLM``, ``GPTNeoXForCausalLM``, GPT-2-style models) or given
explicitly as module names for any other ``nn.Module``.

Each hook slices the requested positions out of its block's output as soon as the block has run
and stores only those (optionally in a smaller dtype), so a 60k-token pass over 24 layers keeps
``n_positions x d_model`` per layer instead of every layer at every position. With
``chunk_size``, our models are fed chunk by chunk with a recurrent cache, so the activations of
the forward itself stay bounded too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fidelity.models.base import CausalLM
from fidelity.models.memmamba import MemMambaLM
from fidelity.probes.capture_types import Capture
from fidelity.probes.memmamba_trace import tracing_memmamba

LayerSelection = None | int | Sequence[int] | Callable[[int], bool]

# (attribute path of the blocks, class-name fragment) for models we know by their layout.
BLOCK_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("backbone.layers", "Mamba"),  # Hugging Face MambaForCausalLM / Mamba2ForCausalLM
    ("gpt_neox.layers", "GPTNeoX"),  # Hugging Face GPTNeoXForCausalLM (Pythia)
    ("transformer.h", "GPT2"),  # Hugging Face GPT-2 style
    ("model.layers", ""),  # Llama-style Hugging Face models
)


class NonFiniteHiddenStateError(RuntimeError):
    """A hidden state held NaN or Inf; ``layer`` and ``position`` say where it first appeared."""

    def __init__(self, layer: int, position: int, row: int) -> None:
        super().__init__(
            f"non-finite hidden state (NaN or Inf) at layer {layer}, position {position} "
            f"(batch row {row})"
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
            raise ValueError(f"modules not found in the model: {missing}")
        return [modules[name] for name in module_names]
    if isinstance(model, CausalLM):
        return list(model.layers)
    class_name = type(model).__name__
    for path, fragment in BLOCK_LOCATIONS:
        blocks = _attribute(model, path)
        if isinstance(blocks, nn.ModuleList) and fragment in class_name:
            return list(blocks)
    raise ValueError(
        f"cannot find the blocks of a {class_name}; pass module_names=[...] with the names of "
        "its residual blocks in order (see model.named_modules())"
    )


def _attribute(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def resolve_layers(selection: LayerSelection, n_layers: int) -> list[int]:
    """Layer indices in ``[0, n_layers]`` picked by ``selection`` (None means all)."""
    every = list(range(n_layers + 1))
    if selection is None:
        return every
    if callable(selection):
        return [layer for layer in every if selection(layer)]
    if isinstance(selection, int):
        selection = [selection]
    layers = sorted({int(layer) for layer in selection})
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise ValueError(
            f"layer indices {bad} out of range: this model has layers 0..{n_layers} "
            "(0 = embeddings, i = output of block i)"
        )
    return layers


def _as_positions(positions: torch.Tensor | Sequence[int] | None, length: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(length)
    positions = torch.as_tensor(positions, dtype=torch.long).flatten().unique(sorted=True)
    if len(positions) and (positions[0] < 0 or positions[-1] >= length):
        raise ValueError(
            f"positions must lie in [0, {length}); got range "
            f"[{int(positions[0])}, {int(positions[-1])}]"
        )
    return positions


@dataclass
class _Recorder:
    """Collects the kept rows of every hooked layer as chunks go by."""

    layers: list[int]
    positions: torch.Tensor
    dtype: torch.dtype | None
    check_finite: bool
    offsets: dict[int, int] = field(default_factory=dict)
    pieces: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        """Keep the requested rows of ``hidden`` `(batch, chunk, d_model)` for ``layer``."""
        start = self.offsets.get(layer, 0)
        end = start + hidden.shape[1]
        self.offsets[layer] = end
        if self.check_finite:
            _raise_if_non_finite(hidden, layer, start)
        lo, hi = torch.searchsorted(self.positions, torch.tensor([start, end])).tolist()
        if hi > lo:
            rows = hidden[:, self.positions[lo:hi].to(hidden.device) - start].detach()
            rows = rows.to(device="cpu", dtype=self.dtype or rows.dtype)
            self.pieces.setdefault(layer, []).append(rows)

    def states(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(self.pieces[layer], dim=1) for layer in self.layers}


def _raise_if_non_finite(hidden: torch.Tensor, layer: int, start: int) -> None:
    finite = torch.isfinite(hidden).all(dim=-1)  # (batch, chunk)
    if not bool(finite.all()):
        row, index = (~finite).nonzero()[0].tolist()
        raise NonFiniteHiddenStateError(layer, start + index, row)


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
        if 0 in chosen:
            handles.append(
                blocks[0].register_forward_pre_hook(
                    lambda _module, args, kwargs: recorder.record(0, _first_tensor(args, kwargs)),
                    with_kwargs=True,
                )
            )
        for index, block in enumerate(blocks):
            if index + 1 in chosen:
                handles.append(
                    block.register_forward_hook(
                        lambda _module, _args, output, layer=index + 1: recorder.record(
                            layer, _output_tensor(output)
                        )
                    )
                )
        result = Capture(
            positions=kept, states={}, tokens=torch.empty(0, dtype=torch.long), length=length
        )
        yield result
        consumed = max(recorder.offsets.values(), default=0)
        if consumed != length:
            raise ValueError(
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
    position of the first NaN/Inf when ``check_finite``. With ``internals`` and a MemMamba
    model, ``cap.internals["memmamba"]`` is a
    :class:`~fidelity.probes.memmamba_trace.MemMambaTrace` (note writes, pool contents, where
    cross-token attention fired, and attention weights at ``attention_positions``). Hooks are
    always removed.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    device = _model_device(model)
    if chunk_size is not None and not isinstance(model, CausalLM):
        raise ValueError("chunk_size needs one of our models (they carry a recurrent cache)")
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
                tracing_memmamba(model, attention_positions)
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
    model: nn.Module, input_ids: torch.Tensor, **capture_options
) -> tuple[torch.Tensor, Capture]:
    """Like TransformerLens' ``run_with_cache``: ``(logits (batch, length, vocab), Capture)``
    from one forward pass (``capture_options`` as for :func:`capture`, without chunking)."""
    if capture_options.get("chunk_size") is not None:
        raise ValueError("run_with_capture runs one pass; use capture(..., chunk_size=...)")
    length = input_ids.shape[1]
    options = {k: v for k, v in capture_options.items() if k != "chunk_size"}
    with torch.no_grad(), capturing(model, length, **options) as result:
        output = model(input_ids.to(_model_device(model)))
    result.tokens = input_ids[:, result.positions].cpu()
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return logits, result
