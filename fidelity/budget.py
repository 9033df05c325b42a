"""Estimates made before a run, and the refusal when it will not fit.

The memory estimate is the peak resident memory of the process: what it holds when the plan is
made (``baseline``: interpreter, libraries, scan kernel, the loaded model), measured, plus what
the run adds on top of it, counted part by part (:class:`RunEstimate`):

- ``kept_states``: the hidden states the capture keeps (positions x kept layers x d_model);
- ``activations``: one block stack's forward over the tokens in flight (a chunk for our models,
  which run chunk by chunk through their recurrent cache, so this does not grow with the
  length; the whole input for a model read in one pass): per row, the blocks' temporaries
  (:data:`ACTIVATION_FLOATS_PER_TOKEN`, per kind of block and per layer), the residual streams
  and the logits (when fed in chunks, :data:`CHUNKED_ACTIVATION_SHARE` of that plus the
  allocator's retention, :data:`CHUNK_RETENTION_BYTES`);
  DeciMamba adds the rows its first decimating layer drops, each through the layers up to it
  (:func:`decimating_depth`);
- ``attention``: the keys and values (every layer's in a cache fed chunk by chunk: every earlier
  position for full attention, with :data:`KEY_VALUE_RETENTION_BYTES`, the memories for the
  Compressive Transformer; one layer's in a single call) and one block of queries' mask (ours,
  :data:`MASK_BYTES`) or eager scores (:data:`SCORE_BYTES`);
- ``length_buffers``: what is as long as the whole input whatever the chunking: the anchor
  draw's permutation and the probe's token ids (:data:`PERMUTATION_BYTES_PER_TOKEN`,
  :data:`PROBE_BYTES_PER_TOKEN`), and MemMamba's allocator retention that grows with the number
  of chunks up to a point (:data:`MEMMAMBA_BYTES_PER_TOKEN_PER_UNIT`,
  :data:`MEMMAMBA_CREEP_TOKENS`);
- ``untraced``: a fixed amount an analysis adds beyond the counted tensors, per kind of model
  (:data:`UNTRACED_BYTES`: measured, not traced to a tensor; 85 MiB for the state-space models,
  27 MiB for attention models);
- ``headroom``: :data:`HEADROOM` of the total, for the spread of the peak between runs.

The per-token factors and the fixed amounts are calibrated against the measured peak resident
memory of real `fidelity analyze` runs at 8k, 60k and 400k tokens (and 200k for the Transformer)
(``benchmarks/memory_calibration.py``, table in ``benchmarks/results/memory_calibration.md``);
each constant says what it was fitted on. Much of what is fitted rather than counted is memory
the C allocator keeps after a chunk frees it (see :data:`CHUNK_RETENTION_BYTES`).

The time estimate is measured: a short forward pass, extrapolated linearly in the length
(quadratically for full attention).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.models.base import CausalLM

# Activation floats a one-pass forward holds per row that goes through every layer: (floats per
# unit of the widest dimension per layer, floats that grow with neither). The widest dimension
# is d_inner for SSMs, the MLP's width for attention models; it counts once per layer because an
# analysis keeps every layer's scan inputs of the tokens in flight for the ssm_decay metric and
# its hooks, so the one-pass growth follows n_layer x d_inner: MemMamba's mini (6 x 256) and
# small (8 x 768) presets at 8k need 3.59 and 3.65 floats per unit (a factor per d_inner alone
# would differ 2.2-fold between them). Calibrated on the peak resident memory of `fidelity
# analyze` at one thread (benchmarks/memory_calibration.py, table in
# benchmarks/results/memory_calibration.md; sessions 27 and 28): Mamba from its mini runs at 2k,
# 4k and 8k (peaks 450, 486 and 586 MiB over a 317 MiB process), MemMamba from mini at 4k and 8k
# (501 and 598 MiB) and small at 8k (1232 MiB over 348), Mamba-2
# from its mini runs at 4k and 8k (its scan inputs are per head, not per channel: far fewer),
# DeciMamba's kept rows as Mamba's; the attention models, which run attention fused on CPU with
# no score matrix, from the mini Transformer and Compressive at 8k (6 layers: about 2 floats
# per MLP unit in all).
ACTIVATION_FLOATS_PER_TOKEN = {
    "memmamba": (3.65, 0),
    "mamba": (3.6, 0),
    "decimamba": (3.6, 0),
    "mamba2": (1.2, 0),
    "attention": (0.34, 0),
}
# A run fed in chunks through the recurrent cache holds part of what one pass over a chunk's
# tokens holds (:data:`CHUNKED_ACTIVATION_SHARE`) plus what the C allocator (glibc malloc)
# keeps of the chunks it has freed, a fixed amount per kind of model
# (:data:`CHUNK_RETENTION_BYTES`). Fitted on the 60k runs at one thread (session 28): MemMamba
# mini and small, whose one-pass activations over a chunk differ 3.8-fold (191 and 733 MiB),
# grew by 266 and 698 MiB; a factor of the one-pass amount (1.39 and 0.95) fits neither, a
# share of it plus a fixed retention fits both. The retention is not a tensor: traced for
# MemMamba mini at 200k with the heap trimmed (`malloc_trim`) after every chunk, the memory
# left after a chunk stays at 814 MB from the first chunk to the seventh, while the resident
# memory before trimming varies between 933 MB and 1.13 GB from one chunk to the next; MemMamba,
# whose tensors change size from chunk to chunk (the notes each segment writes), keeps the most.
# Mamba mini's 60k run peaked 346 and 407 MiB over its process in two runs a few hours apart
# (the second on top of the figure worker's merge, which changed nothing in Mamba): counted at
# the higher. And a CI run on a busy machine (session 29, unchanged Mamba code) measured Mamba
# mini's chunked 20k test run at 827 MB against 700 MB in session 28 on the same code: the
# retention varies between runs by about 120 MiB; Mamba's is counted 48 MiB higher for it (its
# 60k and 400k calibration rows are then 1.10 and 1.12 of their peaks).
CHUNKED_ACTIVATION_SHARE = 0.8
CHUNK_RETENTION_BYTES = {
    "memmamba": 114 << 20,
    "mamba": 144 << 20,
    "decimamba": 96 << 20,
    "mamba2": 53 << 20,
    "attention": 34 << 20,
}
# A full-attention cache fed chunk by chunk keeps every layer's keys and values (one copy: each
# chunk's are concatenated onto them and the old tensor is freed) and reallocates them at every
# chunk; the allocator keeps part of what it frees. Fitted on the mini Transformer's analyses at
# 60k, 200k and 400k (one thread, session 29), whose growth above their counted parts stayed
# between 60k and 400k at 120-270 MiB (the analysis's other parts included) rather than growing
# with the length: past ~65k tokens each layer's keys exceed glibc's largest mmap threshold
# (32 MiB), are mapped and given back whole on free. 128 MiB puts those three rows at 1.07-1.09
# of their peaks; a forward alone at 60k held 220 MiB beyond its keys and values after its last
# chunk.
KEY_VALUE_RETENTION_BYTES = 128 << 20
# Bytes per token of the buffers as long as the input, whatever the chunking: the anchor
# draw's permutation of every position (int64, once) and, per sequence, the probe's token ids
# (int64) with the copy made while building them.
PERMUTATION_BYTES_PER_TOKEN = 8
PROBE_BYTES_PER_TOKEN = 16
# MemMamba's peak also grows with the number of chunks, where Mamba's stays flat, and then
# stops growing. No tensor grows with the length: with the heap trimmed after every chunk, what
# a MemMamba mini run holds after each chunk stays at 814 MB, while the high-water mark creeps
# up chunk after chunk (1013, 1118, 1118, 1135, 1153 MB over its first five chunks, flat at the
# sixth and seventh; session 26): the allocator's retained free memory, which MemMamba's
# chunk-to-chunk varying tensor sizes (the notes each segment writes set the size of its pool
# candidates and membership masks) fragment more than Mamba's fixed ones. Counted per token up
# to MEMMAMBA_CREEP_TOKENS, per unit of n_layer x d_model (mini 768, small 3072). Session 29's
# runs (the attentions by blocks of segments, whose many small tensors move the creep): small
# grew 1388 MiB above its process at 60k and about as much at 400k (its kept states aside), mini
# 432 and 503 MiB; 1.75 bytes up to 64k tokens put small's 60k at 1.02 of its peak and every
# MemMamba row at 1.01-1.12 (session 28's code, before the blocks: 0.36 bytes per token without
# a cap, small growing 357 MiB from 60k to 400k). Session 30's runs (the training-path change)
# put small's 400k at 1.00 with 1.75 (1.62 GB above a 339 MB baseline; 1.54-1.62 GB in three
# runs): 1.85 bytes leaves it 20 MB of margin.
MEMMAMBA_BYTES_PER_TOKEN_PER_UNIT = 1.85
MEMMAMBA_CREEP_TOKENS = 1 << 16
# Bytes per attention score of a model that is not ours (eager attention: scores, softmax).
SCORE_BYTES = 8
# Bytes per (query, key) pair of one block of our attention: the block's boolean mask (1 byte)
# and the float copy `scaled_dot_product_attention` makes of it on CPU (4 bytes): measured as
# 1.0 + 4.0 bytes per pair over 1024 queries and 60k or 200k keys (session 29). Our models feed
# queries in blocks, so this grows with the keys a query sees, not with their square; at 400k
# keys it is 2 GB, as much as the mini Transformer's keys and values.
MASK_BYTES = 5
# An analysis peaks a fixed amount above its counted parts, per kind of model: fitted with the
# activation factors on Mamba mini's one-pass runs at 2k, 4k and 8k, whose growth over the
# process (133, 169 and 269 MiB at one thread, session 28) is not proportional to the tokens
# (85 MiB for the SSMs; DeciMamba's one-pass runs at 6k and 8k, 64 MiB), and on the
# Transformer's and Compressive Transformer's 8k runs (27 MiB: the latter's peak spread
# 431-436 MiB between runs; 20 MiB until session 29 counted the Compressive Transformer's
# memories of every layer in a single call, where one layer's are alive at a time). Not traced
# to a tensor: for the SSMs, candidates are the ssm_decay metric's working set (one block of
# pairs of PAIR_BLOCK_ELEMENTS), the scan kernel's scratch and the allocator's retention.
UNTRACED_BYTES = {
    "memmamba": 85 << 20,
    "mamba": 85 << 20,
    "decimamba": 64 << 20,
    "mamba2": 85 << 20,
    "attention": 27 << 20,
}
# ETMF scores distances in threads, one per torch thread (fidelity.metrics.etmf): each thread
# beyond the first holds its own read-out working set and allocator arena. Measured on main
# ed0d581 with `--threads 2` against the same run with one ETMF thread: Mamba mini at 4k 596
# against 488 MiB, MemMamba mini at 8k 732 against 606 MiB (841fbe7, before the threads);
# Mamba mini at 20k on a busy CI machine 787 MiB, against 666 at one thread. How much the
# threads' working sets overlap depends on how they are scheduled, so this is an upper bound;
# the other constants are fitted on runs at one thread, whose peak does not depend on timing.
READOUT_THREAD_BYTES = 128 << 20
# The same analysis in two fresh processes peaks apart (allocator arenas, threads, which
# library pages are resident: seen for mamba at 4k, 611-631 MB in two runs at once), so the
# estimate adds this fraction of the whole (baseline and counted parts) to stay at or above
# the peak.
HEADROOM = 0.05


class MemoryBudgetError(ValueError):
    """A run would need more memory than is available (or than ``max_memory`` allows)."""


@dataclass
class RunEstimate:
    """Peak-memory estimate of an analysis, in bytes, with its parts."""

    baseline: int
    parameters: int
    kept_states: int
    activations: int
    attention: int
    length_buffers: int
    available: int
    untraced: int = 0

    @property
    def total(self) -> int:
        """Peak resident memory of the process: what it holds now plus what the run adds."""
        return self.baseline + self.added

    @property
    def headroom(self) -> int:
        """The run-to-run spread of the peak: :data:`HEADROOM` of the baseline and the counted
        parts."""
        return int(HEADROOM * (self.baseline + self._parts()))

    @property
    def added(self) -> int:
        """What the run adds to the process: the counted parts, :attr:`untraced` and
        :attr:`headroom`."""
        return self._parts() + self.untraced + self.headroom

    def _parts(self) -> int:
        """What the run adds, without headroom (the model counts when it is not in the
        baseline: on a GPU)."""
        model = self.parameters if self.baseline == 0 else 0
        return model + self.kept_states + self.activations + self.attention + self.length_buffers

    def describe(self) -> str:
        return (
            f"~{format_bytes(self.total)} peak (process now {format_bytes(self.baseline)}, "
            f"model {format_bytes(self.parameters)}, kept states "
            f"{format_bytes(self.kept_states)}, activations "
            f"{format_bytes(self.activations + self.attention)}, inputs "
            f"{format_bytes(self.length_buffers)}, "
            + (f"untraced {format_bytes(self.untraced)}, " if self.untraced else "")
            + f"headroom {format_bytes(self.headroom)}); "
            f"{format_bytes(self.available)} available"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4294967296; accepts B, KB, MB, GB, TB (binary multiples, any case)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"invalid memory size {text!r}: expected a number with a unit, e.g. 4GB")
    value = float(match[1]) * _BYTE_UNITS[match[2].lower()]
    if value <= 0:
        raise InputError(f"invalid memory size {text!r}: must be positive")
    return int(value)


def available_memory(device: torch.device) -> int:
    """Free memory on ``device`` (system RAM for CPU), in bytes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def model_width(model: nn.Module) -> tuple[int, int, int]:
    """(d_model, widest per-token activation, n_layers) of ``model``, ours or Hugging Face."""
    config = getattr(model, "config", None)
    d_model = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
    n_layer = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    if d_model is None or n_layer is None:
        raise ValueError(f"cannot read d_model / n_layer from a {type(model).__name__} config")
    widest = max(
        getattr(config, "d_inner", 0) or 0,
        getattr(config, "intermediate_size", 0) or 0,
        getattr(config, "d_mlp", 0) or 0,
        4 * d_model if _is_attention(model) else 2 * d_model,
    )
    return d_model, widest, n_layer


def _is_attention(model: nn.Module) -> bool:
    name = type(model).__name__.lower()
    return any(key in name for key in ("transformer", "gptneox", "gpt2", "llama", "compressive"))


def _block_kind(model: nn.Module) -> str:
    """Which activation calibration applies: "attention", "memmamba", "decimamba", "mamba2" or
    "mamba" (any other SSM)."""
    if _is_attention(model):
        return "attention"
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return model_type if model_type in ACTIVATION_FLOATS_PER_TOKEN else "mamba"


def decimated_rows(model: nn.Module, rows: int) -> int:
    """How many of ``rows`` input rows reach the last layer: those DeciMamba's first
    decimating layer keeps (every row for other models, and for DeciMamba without
    decimation)."""
    for block in getattr(model, "layers", ()):
        decimation = getattr(block, "decimation", None)
        if decimation is not None:
            return min(rows, decimation.n_kept(rows))
    return rows


def decimating_depth(model: nn.Module) -> int:
    """How many layers every input row goes through: up to and including DeciMamba's first
    decimating layer (all of them for other models). DeciMamba reads its input in one pass, so
    the rows that layer drops count like a one-pass model's of that depth (the shipped
    DeciMamba decimates at layer 3 of 6: 4 x 3.6 floats per d_inner per dropped row, which its
    runs at 60k and 400k tokens, 1.3 GiB and 6.1 GiB, agree with)."""
    layers = list(getattr(model, "layers", ()))
    for index, block in enumerate(layers):
        if getattr(block, "decimation", None) is not None:
            return index + 1
    return len(layers)


def attention_span(model: nn.Module, length: int) -> int:
    """How many keys one query sees at most: the length for full attention, the window or
    memory size for bounded models, 0 for attention-free models."""
    if not _is_attention(model):
        return 0
    config = getattr(model, "config", None)
    for name in ("sliding_window", "attention_span"):
        window = getattr(config, name, None)
        if window:
            return min(int(window), length)
    memories = ("segment_length", "memory_length", "compressed_memory_length")
    if all(getattr(config, name, None) for name in memories):  # Compressive Transformer
        return min(sum(int(getattr(config, name)) for name in memories), length)
    return length


def attention_block(model: nn.Module, tokens_in_flight: int) -> int:
    """Queries whose scores are held at once: the model's attention block or segment."""
    config = getattr(model, "config", None)
    for name in ("attention_block_size", "segment_length"):
        block = getattr(config, name, None)
        if block:
            return min(int(block), tokens_in_flight)
    return tokens_in_flight


def estimate_run(
    model: nn.Module,
    length: int,
    *,
    batch: int = 1,
    n_positions: int,
    n_layers_kept: int,
    store_bytes: int = 4,
    chunk_size: int | None = None,
    readout_threads: int = 1,
) -> RunEstimate:
    """Estimate the peak memory of running ``model`` over ``batch x length`` tokens while
    keeping ``n_positions`` positions of ``n_layers_kept`` layers at ``store_bytes`` each, with
    ``readout_threads`` ETMF threads (:data:`READOUT_THREAD_BYTES` for each beyond the first).

    Python integers throughout: an absurd ``length`` gives an absurd estimate, not an
    overflow."""
    d_model, widest, n_layer = model_width(model)
    config = getattr(model, "config", None)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    parameter_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    tokens_in_flight = min(length, chunk_size) if chunk_size else length
    compute_bytes = 4
    vocab = getattr(config, "vocab_size", 0) or 0
    per_widest, width_free = ACTIVATION_FLOATS_PER_TOKEN[_block_kind(model)]
    # a row through every layer: the blocks' activations, the residual streams, the logits
    per_row = widest * n_layer * per_widest + width_free + 2 * d_model + vocab
    rows_out = decimated_rows(model, tokens_in_flight)
    floats = rows_out * per_row
    if rows_out < tokens_in_flight:  # the dropped rows went through the layers up to it
        depth = decimating_depth(model)
        floats += (tokens_in_flight - rows_out) * (widest * depth * per_widest + 2 * d_model)
    activations = int(batch * floats * compute_bytes)
    chunked_input = bool(chunk_size) and length > chunk_size
    if chunked_input:
        activations = int(activations * CHUNKED_ACTIVATION_SHARE)
        activations += CHUNK_RETENTION_BYTES[_block_kind(model)]
    span = attention_span(model, length)
    attention = 0
    if span:
        # through a cache every layer keeps its keys and values, and a model that is not ours
        # returns them all from one call (Hugging Face's cache); one call of ours holds one
        # layer's at a time
        layer_keys_values = batch * 2 * span * d_model * compute_bytes
        every_layer = chunked_input or not isinstance(model, CausalLM)
        attention = (n_layer if every_layer else 1) * layer_keys_values
        if chunked_input and span == length:
            attention += KEY_VALUE_RETENTION_BYTES
        block = attention_block(model, tokens_in_flight)
        if not isinstance(model, CausalLM):  # eager attention builds the scores
            n_heads = getattr(config, "n_heads", None) or getattr(config, "num_attention_heads", 1)
            attention += batch * n_heads * block * span * SCORE_BYTES
        else:  # fused attention over one block of queries, with its mask
            attention += batch * block * span * MASK_BYTES
    length_buffers = length * PERMUTATION_BYTES_PER_TOKEN + batch * length * PROBE_BYTES_PER_TOKEN
    if _block_kind(model) == "memmamba":
        per_token = MEMMAMBA_BYTES_PER_TOKEN_PER_UNIT * n_layer * d_model
        length_buffers += int(batch * min(length, MEMMAMBA_CREEP_TOKENS) * per_token)
    kept = batch * n_positions * n_layers_kept * d_model * store_bytes
    device = next(model.parameters()).device
    if device.type == "cpu" and isinstance(model, CausalLM) and _block_kind(model) != "attention":
        # the run loads its scan backend (the fused kernel and what it imports) at its first
        # forward: resolve it now, so that "the process now" includes it (and a first compile
        # says so up front); a model or FIDELITY_SCAN_BACKEND set to chunked compiles nothing
        from fidelity.kernels import resolve_backend

        resolve_backend(getattr(config, "scan_backend", "auto"), device, has_initial_state=False)
    baseline = psutil.Process().memory_info().rss if device.type == "cpu" else 0
    return RunEstimate(
        baseline,
        parameter_bytes,
        kept,
        activations,
        attention,
        length_buffers,
        available_memory(device),
        UNTRACED_BYTES[_block_kind(model)] + READOUT_THREAD_BYTES * max(0, readout_threads - 1),
    )


def check_fits(estimate: RunEstimate, max_memory: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate`` exceeds the limit: ``max_memory``
    (for the whole process) when given, else what the run adds must fit in 90% of the memory
    available now."""
    needed = estimate.total if max_memory is not None else estimate.added
    limit = max_memory if max_memory is not None else int(0.9 * estimate.available)
    if needed > limit:
        source = "--max-memory" if max_memory is not None else "available memory"
        raise MemoryBudgetError(
            f"this run needs about {format_bytes(needed)} but {source} allows "
            f"{format_bytes(limit)}; use fewer anchors, fewer layers, a shorter length, a "
            "smaller --chunk-size, or raise --max-memory"
        )


@dataclass(frozen=True)
class ForwardCost:
    """Measured forward time per token: ``fixed`` seconds whatever the context, plus
    ``per_key`` seconds for each key one query attends to (0 for attention-free models)."""

    fixed: float
    per_key: float = 0.0


def _forward_seconds(model: nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timed forwards of ``ids``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def forward_cost(model: CausalLM | nn.Module, probe_tokens: int = 1024) -> ForwardCost:
    """Forward time per token on short random inputs (after one warm-up call).

    Attention-free models: one forward of ``probe_tokens``. Attention models: forwards of
    ``probe_tokens / 2`` and ``probe_tokens`` (best of 2 each), split into a part per token and a
    part per attended key (a causal query at position ``t`` sees ``t + 1`` keys, so a forward of
    ``n`` tokens costs ``n * fixed + n**2 / 2 * per_key``); a negative slope (timing noise) is
    taken as 0.
    """
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 256)
    ids = torch.randint(0, vocab, (1, probe_tokens), device=device)
    model(ids[:, :64])
    if not _is_attention(model) or probe_tokens < 128:
        return ForwardCost(fixed=_forward_seconds(model, ids, 1) / probe_tokens)
    half = probe_tokens // 2
    short = _forward_seconds(model, ids[:, :half], 2) / half
    long = _forward_seconds(model, ids, 2) / probe_tokens
    per_key = max(0.0, (long - short) / ((probe_tokens - half) / 2))
    return ForwardCost(fixed=max(0.0, long - per_key * probe_tokens / 2), per_key=per_key)


def estimate_seconds(model: nn.Module, length: int, batch: int, cost: ForwardCost) -> float:
    """Forward-pass time for ``batch x length`` tokens from a measured :class:`ForwardCost`:
    each query attends to about ``length / 2`` keys under full attention, and to the span
    (window or memory) once the span is shorter than the positions before it."""
    span = attention_span(model, length)
    # past the span a query sees `span` keys; the first `span` positions see fewer
    keys = length / 2 if span >= length else span * (1 - span / (2 * length))
    return (cost.fixed + cost.per_key * keys) * length * batch
