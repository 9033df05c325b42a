"""Influence: how much replacing token ``t`` changes layer ``l`` at position ``t + d``.

For an anchor ``t`` and a sequence, token ``t`` is replaced by a different token drawn
uniformly (seeded), the model is run on the perturbed sequence, and

    influence(l, d) = ||h'[l][t + d] - h[l][t + d]|| / ||h'[l][t] - h[l][t]||

(``h`` clean, ``h'`` perturbed, the residual stream at layer ``l``: the output of block
``l - 1``). It is 1 at ``d = 0`` and measures the causal reach of a token, whatever path carries
it (the scan, MemMamba's pool, attention). The metric ``influence`` is the mean over anchors
(ratios averaged over the sequences of the batch first; a zero denominator, a token the layer
ignores, gives no sample) with a percentile bootstrap interval over anchors. Layer 0 (the
embeddings) is not reported: there the change is confined to ``t`` by construction (0 for every
``d > 0``).

Causal models never need ``d < 0``, and only positions up to ``t + max(distances)`` are run.
Two strategies give the same numbers (tested):

``"full"``
    each perturbed copy runs from position 0 to ``t + max_d`` (batches of ``batch_size``
    copies, with the clean rows in the same call, so clean and perturbed states come from
    identical computations). Cost: about ``n_anchors * batch * (mean anchor + max_d)``
    tokens. Works for any causal model the capture supports (Hugging Face included).
``"branch"`` (our models)
    one clean pass carries the recurrent cache from anchor to anchor; at each anchor two
    copies of the cache run the clean and the perturbed continuation for ``max_d + 1``
    tokens. Cost: ``length + 2 * n_anchors * (max_d + 1)`` tokens per sequence, and one
    cache snapshot (for Transformers, a KV cache of the anchor's prefix) at a time.

``"auto"`` picks ``branch`` for our models and ``full`` otherwise. Distances above
``max_distance`` (default 4096) are dropped, which bounds the cost at any length. DeciMamba is
refused: its decimation is a global top-k over the input, so the model is not causal and a
truncated or chunked run is not the same computation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from numbers import Integral

import pandas as pd
import torch
from torch import nn

from fidelity.metrics.curves import DEFAULT_LEVEL, bootstrap_counts, mean_with_interval
from fidelity.metrics.sampling import seeded_generator
from fidelity.metrics.toolkit import is_causal, resolve_chunk_size, tidy_frame
from fidelity.models.base import CausalLM
from fidelity.probes.capture import capture, capturing, find_blocks
from fidelity.probes.capture_types import Capture

METRIC = "influence"
STRATEGIES = ("auto", "full", "branch")
DEFAULT_MAX_DISTANCE = 4096
"""Distances above this are not measured: a perturbed run costs up to ``max_d`` tokens."""
_ANCHOR_STREAM, _TOKEN_STREAM = 2, 3  # keys of seeded_generator for the two random draws


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise TypeError(
            f"cannot tell the vocabulary size of a {type(model).__name__}: influence needs "
            "model.config.vocab_size (>= 2) to draw replacement tokens"
        )
    return vocab


def _check_ids(input_ids: object, vocab: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
        raise TypeError(f"input_ids must be an integer tensor (batch, length), got {input_ids!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary)")
    return input_ids.long().cpu()


def _check_positions(name: str, values: object, upper: int) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor, got {values!r}")
    if tensor.min() < 0 or tensor.max() >= upper:
        raise ValueError(
            f"{name} must lie in [0, {upper}), got range [{int(tensor.min())}, "
            f"{int(tensor.max())}] (causal influence never needs negative distances)"
        )
    return tensor.long().cpu().unique(sorted=True)


def _resolve_strategy(model: nn.Module, strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "branch" and not isinstance(model, CausalLM):
        raise ValueError("strategy 'branch' needs one of our models (a recurrent cache)")
    if strategy == "auto":
        return "branch" if isinstance(model, CausalLM) else "full"
    return strategy


def replacement_tokens(
    input_ids: torch.Tensor, anchors: torch.Tensor, vocab: int, generator: torch.Generator
) -> torch.Tensor:
    """A different token for every row and anchor, uniform over the other ``vocab - 1`` ids.

    ``input_ids`` `(batch, length)`, ``anchors`` `(n_anchors,)` -> `(batch, n_anchors)` long.
    """
    original = input_ids[:, anchors]  # (batch, n_anchors)
    draw = torch.randint(0, vocab - 1, original.shape, generator=generator)
    return draw + (draw >= original).long()


def _norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||`` over the last axis, in float64."""
    return torch.linalg.vector_norm(a.double() - b.double(), dim=-1)


def _ratios(
    clean: Capture, perturbed: Capture, layers: list[int], offsets: torch.Tensor
) -> torch.Tensor:
    """`(n_layers, rows, n_offsets)` ratios ``||dh[offset]|| / ||dh[0]||`` with every
    position relative to the anchor, kept at ``offsets`` (the first being 0)."""
    out = []
    for layer in layers:
        change = _norms(perturbed.at(layer, offsets), clean.at(layer, offsets))  # (rows, n_off)
        out.append(torch.where(change[:, :1] > 0, change / change[:, :1], torch.nan))
    return torch.stack(out)


def _feed(model: CausalLM, ids: torch.Tensor, cache, chunk: int | None, device) -> None:
    """Run ``ids`` `(batch, n)` through ``model``, continuing ``cache``."""
    step = chunk or max(ids.shape[1], 1)
    for start in range(0, ids.shape[1], step):
        model(ids[:, start : start + step].to(device), cache=cache)


@torch.no_grad()
def _branch(model, ids, anchors, distances, layers, replacements, chunk) -> torch.Tensor:
    """Strategy "branch": `(n_layers, n_dist, n_anchors, batch)` ratios (NaN outside)."""
    batch, length = ids.shape
    device = next(model.parameters()).device
    shape = (len(layers), len(distances), len(anchors), batch)
    result = torch.full(shape, torch.nan, dtype=torch.float64)
    cache = model.init_cache(batch)
    done = 0
    for i, anchor in enumerate(anchors.tolist()):
        _feed(model, ids[:, done:anchor], cache, chunk, device)
        done = anchor
        end = min(length, anchor + int(distances[-1]) + 1)
        clean = ids[:, anchor:end]
        perturbed = clean.clone()
        perturbed[:, 0] = replacements[:, i]
        offsets = distances[distances < end - anchor]  # (n_valid,), starts with 0
        runs = []
        for segment in (clean, perturbed):
            with capturing(model, end - anchor, layers, offsets) as cap:
                _feed(model, segment, copy.deepcopy(cache), chunk, device)
            runs.append(cap)
        ratios = _ratios(runs[0], runs[1], layers, offsets)  # (n_layers, batch, n_valid)
        result[:, : len(offsets), i] = ratios.transpose(1, 2)
    return result


@torch.no_grad()
def _full(model, ids, anchors, distances, layers, replacements, chunk, batch_size):
    """Strategy "full": `(n_layers, n_dist, n_anchors, batch)` ratios (NaN outside)."""
    batch, length = ids.shape
    shape = (len(layers), len(distances), len(anchors), batch)
    result = torch.full(shape, torch.nan, dtype=torch.float64)
    items = [(i, row) for i in range(len(anchors)) for row in range(batch)]  # anchor order
    for first in range(0, len(items), batch_size):
        group = items[first : first + batch_size]
        end = min(length, int(anchors[group[-1][0]]) + int(distances[-1]) + 1)
        rows = sorted({row for _, row in group})
        copies = ids[rows + [row for _, row in group], :end].clone()  # clean rows, then copies
        for k, (i, row) in enumerate(group):
            copies[len(rows) + k, anchors[i]] = replacements[row, i]
        wanted = {int(anchors[i]) + d for i, _ in group for d in distances.tolist()}
        positions = torch.tensor(sorted(p for p in wanted if p < end))
        use_chunks = chunk if chunk is not None and end > chunk else None
        cap = capture(model, copies, layers=layers, positions=positions, chunk_size=use_chunks)
        for k, (i, row) in enumerate(group):
            anchor = int(anchors[i])
            offsets = distances[distances < end - anchor]
            at = anchor + offsets
            clean_row, copy_row = rows.index(row), len(rows) + k
            change = torch.stack(
                [
                    _norms(cap.at(layer, at)[copy_row], cap.at(layer, at)[clean_row])
                    for layer in layers
                ]
            )  # (n_layers, n_valid)
            ratio = torch.where(change[:, :1] > 0, change / change[:, :1], torch.nan)
            result[:, : len(offsets), i, row] = ratio
    return result


def influence(
    model: nn.Module,
    input_ids: torch.Tensor,
    anchors: torch.Tensor | Sequence[int],
    distances: torch.Tensor | Sequence[int],
    layers: Sequence[int] | None = None,
    *,
    n_anchors: int = 32,
    replacement: str = "random",
    seed: int = 0,
    batch_size: int = 8,
    chunk_size: int | str | None = "auto",
    max_distance: int = DEFAULT_MAX_DISTANCE,
    strategy: str = "auto",
    n_boot: int = 200,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """Perturbation influence of ``model`` on ``input_ids`` `(batch, length)` as a tidy frame.

    ``anchors`` `(n,)`: candidate positions, of which ``n_anchors`` are drawn (seeded);
    ``distances`` `(n_dist,)` non-negative, those above ``max_distance`` dropped, 0 always
    included (the reference change, value 1); ``layers``:
    layer indices (0 is skipped; None: every block's output). ``replacement``: "random" (a
    uniformly drawn different token per row and anchor). ``batch_size``: perturbed copies per
    forward ("full" strategy). ``chunk_size``: "auto" (the model's own chunk length, see
    :meth:`fidelity.models.base.CausalLM.auto_chunk_size`), None (one call) or an int.
    ``strategy``: "auto", "full" or "branch" (see the module docstring). Columns: ``metric,
    layer, distance, value, ci_low, ci_high, n, source_layer`` with ``n`` the number of
    (sequence, anchor) ratios.
    """
    if not is_causal(model):
        raise TypeError(
            f"influence does not support {type(model).__name__} (e.g. DeciMamba: decimation is "
            "a global top-k over the input), a model that is not causal: perturbed runs cannot "
            "be truncated or chunked"
        )
    if replacement != "random":
        raise ValueError(f"replacement must be 'random', got {replacement!r}")
    vocab = _vocab_size(model)
    ids = _check_ids(input_ids, vocab)
    length = ids.shape[1]
    n_anchors = _check_int("n_anchors", n_anchors, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    max_distance = _check_int("max_distance", max_distance, 0)
    candidates = _check_positions("anchors", anchors, length)
    distances = _check_positions("distances", distances, length)
    distances = torch.cat([torch.zeros(1, dtype=torch.long), distances[distances > 0]])
    distances = distances[distances <= max_distance]
    n_blocks = len(find_blocks(model))
    chosen = list(range(1, n_blocks + 1)) if layers is None else sorted(set(layers) - {0})
    bad = [layer for layer in chosen if not 0 < layer <= n_blocks]
    if bad or not chosen:
        raise ValueError(
            f"layers {bad or list(layers)} cannot be measured: this model has layers "
            f"1..{n_blocks} (layer 0, the embeddings, is not reported)"
        )
    strategy = _resolve_strategy(model, strategy)
    chunk = resolve_chunk_size(model, chunk_size)
    picked = torch.randperm(len(candidates), generator=seeded_generator(seed, _ANCHOR_STREAM))
    chosen_anchors = candidates[picked[:n_anchors]].sort().values
    tokens = seeded_generator(seed, _TOKEN_STREAM)
    replacements = replacement_tokens(ids, chosen_anchors, vocab, tokens)
    args = (model, ids, chosen_anchors, distances, chosen, replacements, chunk)
    was_training = model.training
    model.eval()
    try:
        ratios = _branch(*args) if strategy == "branch" else _full(*args, batch_size)
    finally:
        model.train(was_training)
    return _frame(ratios, chosen, distances, seed, n_boot, level)


def _frame(
    ratios: torch.Tensor,
    layers: list[int],
    distances: torch.Tensor,
    seed: int,
    n_boot: int,
    level: float,
) -> pd.DataFrame:
    """Tidy rows from ratios `(n_layers, n_dist, n_anchors, batch)`."""
    rows = []
    for j, distance in enumerate(distances.tolist()):
        for k, layer in enumerate(layers):
            samples = ratios[k, j]  # (n_anchors, batch)
            finite = torch.isfinite(samples)
            per_anchor = samples.nan_to_num(0.0).sum(1) / finite.sum(1)  # NaN: no sample
            per_anchor = per_anchor[torch.isfinite(per_anchor)].numpy()
            if per_anchor.size == 0:
                continue
            counts = bootstrap_counts(per_anchor.size, n_boot, [seed, distance]) if n_boot else None
            value, low, high = mean_with_interval(per_anchor, counts, level)
            rows.append((METRIC, layer, distance, value, low, high, int(finite.sum()), layer))
    return tidy_frame(rows)
