"""SSM decay: the exact weight with which input ``s`` reaches output ``t`` inside a Mamba layer.

A Mamba-1 mixer's scan is ``h_t = exp(delta'_t A) h_(t-1) + delta'_t B_t u_t`` and
``y_t = C_t . h_t`` (plus the skip ``D u_t`` and the gate), per channel ``c`` with a state of
``d_state`` entries. Unrolled, ``y_t[c] = sum_(s <= t) K_c(s, t) u_s[c]`` with the kernel

    K_c(s, t) = sum_n C_t[n] exp(A[c, n] (S_t[c] - S_s[c])) delta'_s[c] B_s[n]

where ``delta' = softplus(delta + dt_bias)`` and ``S`` is the running sum of ``delta'`` over
time (``prod_(r = s+1..t) exp(delta'_r A) = exp(A (S_t - S_s))``). The metric ``ssm_decay`` is

    w(s, t) = mean_c |K_c(s, t)|

for anchors ``s = t_i`` and targets ``t = t_i + d``, averaged over anchors (and sequences),
with a percentile bootstrap interval over anchors. It describes the scan path only: the skip
term, the gate, MemMamba's pools and attention and every other layer are outside it.

Nothing of size ``length x d_inner x d_state`` is built. Hooks see each chunk's scan inputs:
for our Mamba-1 mixer, the output of its ``x_proj`` as the forward pass computes it; for the
other mixers, the normalized block input, from which the scan inputs are recomputed (keeping the
convolution's last inputs across chunks, so chunked passes give the values of one pass). ``S``
is carried in float64 (memory ``O(d_inner)`` per layer across chunks); ``S``, ``delta'`` and
``B`` are kept at the anchors only, and every (anchor, target) pair is evaluated as soon as its
target arrives (the exponentials in the model's dtype, at least float32: about 1e-6 relative
for float32 models). Memory per layer: ``batch x n_anchors x (2 d_inner + d_state)`` float64
plus the results; time per chunk: ``pairs x d_inner x d_state`` exponentials (and, for mixers
other than ours, the mixer's input projections again).

Supported mixers: our Mamba-1 ``MambaMixer`` (MambaLM, MemMambaLM, DeciMambaLM), Hugging Face
``MambaForCausalLM``'s ``MambaMixer`` (same parameters), and our ``Mamba2Mixer`` (one decay per
head: ``A`` is a scalar per head, ``B`` and ``C`` are shared by the heads of a group; the mean
over channels is then the mean over heads). DeciMamba: a layer whose decimation drops rows scans
only the kept rows, so from the first block that drops rows on, layers are skipped (with a
warning and an entry in :attr:`SsmDecayCollector.notes`); when no rows are dropped (inputs
within the budgets) every layer is exactly Mamba's and is measured.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fidelity.metrics.curves import DEFAULT_LEVEL, bootstrap_counts, mean_with_interval
from fidelity.metrics.toolkit import tidy_frame
from fidelity.models.base import causal_conv1d, conv_window
from fidelity.models.mamba import MambaMixer, channel_major_product
from fidelity.models.mamba2 import Mamba2Mixer
from fidelity.probes.capture import find_blocks
from fidelity.probes.capture_types import block_before, layer_after

METRIC = "ssm_decay"
PAIR_BLOCK_ELEMENTS = 1 << 20
"""Pairs are evaluated in blocks of at most this many ``batch x pairs x channels x d_state``
elements (4 MiB in float32: a block's exponentials stay in cache; measured 2x faster than
32 MiB blocks)."""


@dataclass
class ScanParts:
    """The scan inputs of one chunk that the kernel needs (``step``, ``A``, ``B``, ``C`` in
    float64).

    ``step`` `(batch, n_channels, length)`: ``delta'`` after bias and softplus; ``A``
    `(n_channels, n_a)` with ``n_a = d_state`` (Mamba-1) or 1 (Mamba-2, one decay per head);
    ``B``, ``C`` `(batch, n_groups, d_state, length)`; ``group`` `(n_channels,)`: the group whose
    ``B``/``C`` each channel reads; ``conv_input`` `(batch, conv_channels, length)`: the raw
    convolution inputs (the next chunk's prefix is their tail; None when the parts come from the
    mixer's own forward pass); ``work_dtype``: the model's
    dtype, at least float32, in which pair kernels are evaluated.
    """

    step: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    group: torch.Tensor
    conv_input: torch.Tensor | None
    work_dtype: torch.dtype


EXPONENT_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
"""Exponents are clamped here before ``exp`` (in place): below it, ``exp`` leaves the normal
range and takes a slow path (~30x on x86) while the terms are negligible anyway (an absolute
error below ``exp(floor) * |C_t B_s|``: 2e-35 in float32, 1e-304 in float64)."""
LOG2_E = 1 / math.log(2)
"""``exp(x) = exp2(x * LOG2_E)``: the exponentials are taken as powers of 2, which torch
computes about 3x faster than ``exp`` on this CPU (AVX-512, float32) at the same accuracy
(both within 1e-5 relative of float64 for the float32 exponents of the kernel, measured)."""


def _exp_floored(exponents: torch.Tensor) -> torch.Tensor:
    """``exp(max(exponents, floor))`` for ``exponents`` given in base 2 (``x * LOG2_E``),
    computed in place."""
    return exponents.clamp_(min=EXPONENT_FLOOR[exponents.dtype] * LOG2_E).exp2_()


def _work_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class MixerReader:
    """Recomputes a mixer's :class:`ScanParts` from its normalized input `(batch, length,
    d_model)` and the convolution prefix `(batch, conv_channels, conv_width - 1)`."""

    conv_channels: int
    conv_width: int

    def parts(self, hidden: torch.Tensor, prefix: torch.Tensor) -> ScanParts:
        raise NotImplementedError


class OurMamba1Reader(MixerReader):
    """Our :class:`~fidelity.models.mamba.MambaMixer`, through its ``ssm_inputs``; or, without
    recomputing them, from the output of its ``x_proj`` during the forward pass
    (:meth:`parts_from_projection`)."""

    def __init__(self, mixer: MambaMixer) -> None:
        self.mixer = mixer
        self.conv_channels = mixer.config.d_inner
        self.conv_width = mixer.config.d_conv

    def parts(self, hidden: torch.Tensor, prefix: torch.Tensor) -> ScanParts:
        inputs = self.mixer.ssm_inputs(hidden, prefix)
        return self._parts(inputs["delta"], inputs["B"], inputs["C"], inputs["conv_input"])

    def parts_from_projection(self, projected: torch.Tensor) -> ScanParts:
        """The parts from ``x_proj``'s output `(batch, length, dt_rank + 2 d_state)`; no
        ``conv_input`` (the mixer itself carries the convolution across chunks)."""
        config = self.mixer.config
        dt, B, C = torch.split(
            projected, [config.resolved_dt_rank, config.d_state, config.d_state], dim=-1
        )
        delta = channel_major_product(self.mixer.dt_proj.weight, dt)  # (batch, d_inner, L)
        return self._parts(delta, B.transpose(1, 2), C.transpose(1, 2), None)

    def _parts(
        self, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor, conv_input: torch.Tensor | None
    ) -> ScanParts:
        """``delta`` `(batch, d_inner, length)` before bias and softplus, ``B``, ``C`` `(batch,
        d_state, length)`."""
        bias = self.mixer.dt_proj.bias.to(delta.dtype)[:, None]
        return ScanParts(
            step=F.softplus(delta + bias).double(),  # in the model's dtype, as its scan does
            A=-torch.exp(self.mixer.A_log.double()),
            B=B.double()[:, None],  # (batch, 1, d_state, length)
            C=C.double()[:, None],
            group=torch.zeros(self.conv_channels, dtype=torch.long, device=delta.device),
            conv_input=conv_input,
            work_dtype=_work_dtype(delta),
        )


class HuggingFaceMamba1Reader(MixerReader):
    """Hugging Face's ``MambaMixer`` (``MambaForCausalLM``): same parameters as ours."""

    def __init__(self, mixer: nn.Module) -> None:
        self.mixer = mixer
        self.conv_channels = int(mixer.intermediate_size)
        self.conv_width = int(mixer.conv_kernel_size)
        self.dt_rank = int(mixer.time_step_rank)
        self.d_state = int(mixer.ssm_state_size)

    def parts(self, hidden: torch.Tensor, prefix: torch.Tensor) -> ScanParts:
        mixer = self.mixer
        xz = mixer.in_proj(hidden).transpose(1, 2)  # (batch, 2 * d_inner, length)
        x, _ = xz.chunk(2, dim=1)  # (batch, d_inner, length)
        u = F.silu(causal_conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, prefix))
        dt, B, C = torch.split(
            mixer.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # (batch, length, dt_rank), (batch, length, d_state) x 2
        delta = (dt @ mixer.dt_proj.weight.t()).transpose(1, 2)  # (batch, d_inner, length)
        return ScanParts(
            step=F.softplus(delta.double() + mixer.dt_proj.bias.double()[:, None]),
            A=-torch.exp(mixer.A_log.double()),
            B=B.transpose(1, 2).double()[:, None],  # (batch, 1, d_state, length)
            C=C.transpose(1, 2).double()[:, None],
            group=torch.zeros(self.conv_channels, dtype=torch.long, device=hidden.device),
            conv_input=x,
            work_dtype=_work_dtype(hidden),
        )


class Mamba2Reader(MixerReader):
    """Our :class:`~fidelity.models.mamba2.Mamba2Mixer`: channels are heads (every channel of
    a head has the same kernel), ``A`` is one number per head."""

    def __init__(self, mixer: Mamba2Mixer) -> None:
        config = mixer.config
        self.mixer = mixer
        self.conv_channels = config.conv_dim
        self.conv_width = config.d_conv
        self.splits = [config.d_inner, config.conv_dim, config.nheads]
        group_width = config.ngroups * config.d_state
        self.xbc_splits = [config.d_inner, group_width, group_width]
        self.ngroups, self.d_state, self.nheads = config.ngroups, config.d_state, config.nheads

    def parts(self, hidden: torch.Tensor, prefix: torch.Tensor) -> ScanParts:
        mixer = self.mixer
        batch, length, _ = hidden.shape
        _, xBC, dt = torch.split(mixer.in_proj(hidden), self.splits, dim=-1)
        conv_input = xBC.transpose(1, 2)  # (batch, conv_dim, length)
        conv_out = F.silu(causal_conv1d(conv_input, mixer.conv1d.weight, mixer.conv1d.bias, prefix))
        _, B, C = torch.split(conv_out, self.xbc_splits, dim=1)  # (batch, ngroups * d_state, L)
        heads_per_group = self.nheads // self.ngroups
        return ScanParts(
            step=F.softplus(dt.double() + mixer.dt_bias.double()).transpose(1, 2),
            A=-torch.exp(mixer.A_log.double())[:, None],  # (nheads, 1)
            B=B.double().reshape(batch, self.ngroups, self.d_state, length),
            C=C.double().reshape(batch, self.ngroups, self.d_state, length),
            group=torch.arange(self.nheads, device=hidden.device) // heads_per_group,
            conv_input=conv_input,
            work_dtype=_work_dtype(hidden),
        )


def mixer_reader(mixer: object) -> MixerReader | None:
    """The reader for a supported mixer, or None."""
    if isinstance(mixer, MambaMixer):
        return OurMamba1Reader(mixer)
    if isinstance(mixer, Mamba2Mixer):
        return Mamba2Reader(mixer)
    is_hf_mamba1 = (
        type(mixer).__name__ == "MambaMixer"
        and isinstance(getattr(mixer, "A_log", None), torch.Tensor)
        and mixer.A_log.dim() == 2
        and getattr(mixer, "activation", None) in ("silu", "swish")
    )
    return HuggingFaceMamba1Reader(mixer) if is_hf_mamba1 else None


class _DecimationWatch:
    """Which block first dropped rows (DeciMamba); layers from there on are skipped."""

    def __init__(self) -> None:
        self.first_dropping_block: int | None = None

    def dropped(self, block: int) -> None:
        if self.first_dropping_block is None or block < self.first_dropping_block:
            self.first_dropping_block = block

    def affects(self, block: int) -> bool:
        return self.first_dropping_block is not None and block >= self.first_dropping_block


class LayerDecay:
    """Running state of one mixer: the cumulative step sizes, the anchors' data, the results.

    ``anchors`` `(n_anchors,)` sorted positions, ``distances`` `(n_dist,)`; :meth:`observe`
    takes consecutive chunks of the normalized block input.
    """

    def __init__(
        self,
        reader: MixerReader,
        block: int,
        anchors: torch.Tensor,
        distances: torch.Tensor,
        watch: _DecimationWatch,
    ) -> None:
        self.reader = reader
        self.block = block
        self.anchors = anchors
        self.distances = distances
        self.targets = anchors[:, None] + distances[None, :]  # (n_anchors, n_dist)
        self.watch = watch
        self.offset = 0
        self.skipped = False
        self.prefix: torch.Tensor | None = None  # (batch, conv_channels, conv_width - 1)
        self.cumulative: torch.Tensor | None = None  # (batch, n_channels): S at offset - 1
        self.anchor_sum: torch.Tensor | None = None  # (batch, n_anchors, n_channels): S_s
        self.anchor_step: torch.Tensor | None = None  # (batch, n_anchors, n_channels)
        self.anchor_B: torch.Tensor | None = None  # (batch, n_anchors, n_groups, d_state)
        self.values: torch.Tensor | None = None  # (batch, n_anchors, n_dist), NaN until seen

    def kept_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps across chunks."""
        kept = (
            self.prefix,
            self.cumulative,
            self.anchor_sum,
            self.anchor_step,
            self.anchor_B,
            self.values,
        )
        return [t for t in kept if t is not None]

    def _allocate(self, parts: ScanParts) -> None:
        batch, n_channels, _ = parts.step.shape
        _, n_groups, d_state, _ = parts.B.shape
        n_anchors, n_dist = self.targets.shape
        options = {"dtype": torch.float64, "device": parts.step.device}
        self.cumulative = torch.zeros(batch, n_channels, **options)
        self.anchor_sum = torch.zeros(batch, n_anchors, n_channels, **options)
        self.anchor_step = torch.zeros(batch, n_anchors, n_channels, **options)
        self.anchor_B = torch.zeros(batch, n_anchors, n_groups, d_state, **options)
        self.values = torch.full((batch, n_anchors, n_dist), torch.nan, **options)

    @torch.no_grad()
    def observe(self, hidden: torch.Tensor) -> None:
        """Take the next chunk, ``hidden`` `(batch, length, d_model)` (the mixer's input)."""
        if self.watch.affects(self.block):
            self.skipped = True
        if self.skipped:  # nothing recomputed for a skipped layer
            return
        if self.prefix is None:
            width = self.reader.conv_width - 1
            self.prefix = hidden.new_zeros(hidden.shape[0], self.reader.conv_channels, width)
        self.take(self.reader.parts(hidden, self.prefix))

    @torch.no_grad()
    def take(self, parts: ScanParts) -> None:
        """Take the next chunk's :class:`ScanParts` (from :meth:`observe`, or from the mixer's
        own forward pass)."""
        if self.watch.affects(self.block):
            self.skipped = True
        if self.skipped:
            return
        if self.values is None:
            self._allocate(parts)
        start, length = self.offset, parts.step.shape[-1]
        sums = self.cumulative[:, :, None] + parts.step.cumsum(-1)  # (batch, n_channels, length)
        self.cumulative = sums[:, :, -1]
        self._keep_anchors(parts, sums, start, start + length)
        self._score_targets(parts, sums, start, start + length)
        if parts.conv_input is not None:
            self.prefix = conv_window(self.prefix, parts.conv_input)
        self.offset = start + length

    def _keep_anchors(self, parts: ScanParts, sums: torch.Tensor, start: int, end: int) -> None:
        lo, hi = torch.searchsorted(self.anchors, torch.tensor([start, end])).tolist()
        if hi == lo:
            return
        local = (self.anchors[lo:hi] - start).to(sums.device)
        self.anchor_sum[:, lo:hi] = sums[:, :, local].transpose(1, 2)
        self.anchor_step[:, lo:hi] = parts.step[:, :, local].transpose(1, 2)
        self.anchor_B[:, lo:hi] = parts.B[..., local].permute(0, 3, 1, 2)

    def _score_targets(self, parts: ScanParts, sums: torch.Tensor, start: int, end: int) -> None:
        """Evaluate every (anchor, distance) pair whose target lies in ``[start, end)``.

        The running sums stay float64 (their differences are the exact elapsed step sizes);
        the exponentials and products are computed in ``parts.work_dtype`` (the model's dtype,
        at least float32), summed over the ``d_state`` states for Mamba-1, with the scalar decay
        factored out for Mamba-2."""
        inside = (self.targets >= start) & (self.targets < end)
        anchor_index, distance_index = inside.nonzero(as_tuple=True)  # (n_pairs,) each
        if anchor_index.numel() == 0:
            return
        batch, n_channels, _ = sums.shape
        d_state = parts.B.shape[2]
        block = max(1, PAIR_BLOCK_ELEMENTS // (batch * n_channels * d_state))
        device, work = sums.device, parts.work_dtype
        A_by_state = (parts.A * LOG2_E).to(work).T.contiguous()  # (n_a, n_channels), base 2
        # position-major copies of the target positions only, so that each pair gathers
        # contiguous rows
        targets, slot = torch.unique(
            self.targets[anchor_index, distance_index] - start, return_inverse=True
        )
        targets, slot = targets.to(device), slot.to(device)
        sums_at = sums[:, :, targets].transpose(1, 2).contiguous()  # (batch, n_targets, n_chan)
        C_at = parts.C[..., targets].permute(0, 3, 1, 2).contiguous()  # (b, n_targets, g, n)
        for first in range(0, anchor_index.numel(), block):
            i = anchor_index[first : first + block]
            j = distance_index[first : first + block]
            local = slot[first : first + block]
            i = i.to(device)
            elapsed = (sums_at[:, local] - self.anchor_sum[:, i]).to(work)  # (b, P, chan)
            readout = (C_at[:, local] * self.anchor_B[:, i]).to(work)  # (b, P, g, n)
            if A_by_state.shape[0] == 1:  # Mamba-2: one decay per head, B and C per group
                decay = _exp_floored(elapsed * A_by_state[0])  # (batch, P, n_channels)
                kernel = decay * readout.sum(-1)[:, :, parts.group]
            else:  # Mamba-1: one group, a decay per channel and state, summed over the states
                decay = _exp_floored(elapsed[:, :, None, :] * A_by_state)  # (b, P, n, chan)
                kernel = decay.mul_(readout[:, :, 0, :, None]).sum(2)  # (b, P, n_channels)
            kernel = kernel.mul_(self.anchor_step[:, i].to(work)).abs_()
            self.values[:, i, j.to(device)] = kernel.mean(-1, dtype=torch.float64)


class SsmDecayCollector:
    """Collects ``ssm_decay`` while a forward pass (one pass or consecutive chunks of one
    sequence) runs; :meth:`frame` gives the tidy result afterwards.

    ``notes`` lists layers that could not be measured and why.
    """

    def __init__(
        self,
        layers: dict[int, LayerDecay],
        anchors: torch.Tensor,
        distances: torch.Tensor,
        length: int,
    ) -> None:
        self.layers = layers
        self.anchors = anchors
        self.distances = distances
        self.length = length
        self.notes: list[str] = []

    def kept_bytes(self) -> int:
        """Bytes held across chunks by every layer (independent of the sequence length)."""
        return sum(
            t.numel() * t.element_size() for s in self.layers.values() for t in s.kept_tensors()
        )

    def per_anchor(self) -> dict[int, torch.Tensor]:
        """``{layer: (n_dist, n_anchors) float64}``: ``w(t_i, t_i + d_j)`` averaged over the
        batch, NaN where ``t_i + d_j >= length``; skipped layers are left out."""
        result = {}
        for layer, state in sorted(self.layers.items()):
            if state.skipped:
                continue
            if state.offset != self.length:
                raise ValueError(
                    f"ssm_decay saw {state.offset} tokens in layer {layer}, expected one sequence "
                    f"of {self.length}; run the model over the whole input inside the context"
                )
            result[layer] = state.values.mean(dim=0).T.cpu()  # (n_dist, n_anchors)
        return result

    def frame(self, n_boot: int = 200, seed: int = 0, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
        """Tidy frame (columns ``metric, layer, distance, value, ci_low, ci_high, n,
        source_layer``): mean ``w`` over the valid anchors of each distance with a percentile
        bootstrap interval over anchors (the replicates of ETMF for the same seed and
        distance); ``n`` = batch x valid anchors; ``layer == source_layer`` = block index + 1."""
        rows = []
        per_anchor = self.per_anchor()
        batch = {layer: self.layers[layer].values.shape[0] for layer in per_anchor}
        for j, distance in enumerate(self.distances.tolist()):
            valid = int((self.anchors + distance < self.length).sum())  # a prefix of anchors
            if valid == 0:
                continue
            counts = bootstrap_counts(valid, n_boot, [seed, distance]) if n_boot else None
            for layer, values in per_anchor.items():
                value, low, high = mean_with_interval(values[j, :valid].numpy(), counts, level)
                n = batch[layer] * valid
                rows.append((METRIC, layer, distance, value, low, high, n, layer))
        return tidy_frame(rows)


def _check_positions(name: str, values: object, upper: int | None) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor, got {values!r}")
    tensor = tensor.long().cpu()
    if tensor.min() < 0 or (upper is not None and tensor.max() >= upper):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must lie in {bound}, got range [{tensor.min()}, {tensor.max()}]")
    return tensor


def _mixer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states", kwargs.get("hidden"))
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError("cannot find the hidden-state input of a mixer call")


@contextlib.contextmanager
def collect_ssm_decay(
    model: nn.Module,
    anchors: torch.Tensor,
    distances: torch.Tensor,
    length: int,
    layers: Sequence[int] | None = None,
) -> Iterator[SsmDecayCollector]:
    """Hooks that measure ``ssm_decay`` while ``model`` runs over one sequence of ``length``.

    ``anchors`` `(n_anchors,)` sorted unique positions in ``[0, length)``; ``distances``
    `(n_dist,)` non-negative; ``layers`` the layer indices to measure (block ``i`` writes layer
    ``i + 1``; layer 0, the embeddings, has no mixer and is ignored; None: every block). Run
    the model inside the block (in one call, e.g. :func:`fidelity.capture`, or in consecutive
    chunks with a cache), then call ``frame()`` on the yielded collector. Raises ``TypeError``
    on entry when a selected block has no supported Mamba mixer (the message says "not a
    Mamba-family model" when none has). Hooks are removed on exit.
    """
    if isinstance(length, bool) or not isinstance(length, Integral) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    anchors = _check_positions("anchors", anchors, int(length))
    if anchors.numel() > 1 and not bool((anchors[1:] > anchors[:-1]).all()):
        raise ValueError("anchors must be sorted and unique (as sample_anchors returns them)")
    distances = _check_positions("distances", distances, None).unique(sorted=True)
    blocks = find_blocks(model)
    wanted = range(1, len(blocks) + 1) if layers is None else sorted(set(layers) - {0})
    bad = [layer for layer in wanted if not 0 < layer <= len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{len(blocks)}")
    readers = {
        layer: mixer_reader(getattr(blocks[block_before(layer)], "mixer", None)) for layer in wanted
    }
    if wanted and all(reader is None for reader in readers.values()):
        raise TypeError(
            f"ssm_decay needs Mamba mixers: {type(model).__name__} is not a Mamba-family model "
            "(supported: our Mamba, MemMamba, DeciMamba and Mamba-2 models, Hugging Face "
            "MambaForCausalLM)"
        )
    unsupported = [layer for layer, reader in readers.items() if reader is None]
    if unsupported:
        raise TypeError(f"layers {unsupported} of {type(model).__name__} have no Mamba mixer")
    watch = _DecimationWatch()
    states = {
        layer: LayerDecay(reader, block_before(layer), anchors, distances, watch)
        for layer, reader in readers.items()
    }
    collector = SsmDecayCollector(states, anchors, distances, int(length))
    handles = []
    try:
        for state in states.values():
            block = blocks[state.block]
            if getattr(block, "decimation", None) is not None:
                handles.append(
                    block.decimation.register_forward_hook(
                        _decimation_hook(block, state.block, state, watch, collector)
                    )
                )
            elif isinstance(state.reader, OurMamba1Reader):  # the mixer's own scan inputs
                handles.append(
                    block.mixer.x_proj.register_forward_hook(
                        lambda _m, _args, output, state=state: (
                            output.dim() == 3
                            and state.take(state.reader.parts_from_projection(output))
                        )
                    )
                )
            else:
                handles.append(
                    block.mixer.register_forward_pre_hook(
                        lambda _m, args, kwargs, state=state: state.observe(
                            _mixer_input(args, kwargs)
                        ),
                        with_kwargs=True,
                    )
                )
        for index, block in enumerate(blocks):  # decimating blocks not measured still drop rows
            if layer_after(index) not in states and getattr(block, "decimation", None) is not None:
                handles.append(
                    block.decimation.register_forward_hook(
                        _decimation_hook(block, index, None, watch, collector)
                    )
                )
        yield collector
    finally:
        for handle in handles:
            handle.remove()


def _decimation_hook(
    block: nn.Module,
    index: int,
    state: LayerDecay | None,
    watch: _DecimationWatch,
    collector: SsmDecayCollector,
):
    """A forward hook for the ``decimation`` submodule of block ``index``. A decimating block
    never calls its mixer's forward, so its input (which the submodule receives) is observed
    here; when rows are dropped, this block and every later one are skipped."""

    def hook(_module: nn.Module, args: tuple, output) -> None:
        hidden = args[0]  # (batch, n_rows, d_model): the block input
        if output.index.shape[1] < hidden.shape[1]:
            if watch.first_dropping_block is None:
                message = (
                    f"ssm_decay skipped layers {layer_after(index)} and above: DeciMamba "
                    f"decimation in block {index} dropped rows (the scan then runs over the kept "
                    "rows only)"
                )
                collector.notes.append(message)
                warnings.warn(message, stacklevel=2)
            watch.dropped(index)
        if state is not None:
            with torch.no_grad():
                state.observe(block.norm(hidden))

    return hook
