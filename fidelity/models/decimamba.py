"""DeciMamba (Ben-Kish et al. 2024, arXiv 2406.14528): Mamba with training-free token decimation.

In each *decimating layer*, the block computes the mixer's step sizes ``delta'_t =
softplus(delta_t + dt_bias)`` for every incoming row (after the causal convolution, which still
sees every row), scores each row by the mean of ``delta'_t`` over channels (``"norm"``: the L2
norm, as the authors' code does), keeps the ``k`` best-scoring rows, and runs the selective
scan over the kept rows only. The block's output is the residual stream at the kept rows plus
the mixer's output there, so **a decimating block returns fewer rows than it receives**:
`(batch, n_in, d_model)` -> `(batch, n_kept, d_model)`, and every later layer sees only those.

Budgets, as in the paper: the ``s``-th decimating layer (``s = 0, 1, ...``) keeps
``k = max(L_base * beta**s, min_length)`` rows out of the rows it may drop (capped by their
number), plus the last ``keep_last_tokens`` rows, which are never dropped (the official code's
"response tokens"; the default 1 keeps the last token so its next-token logits exist). When a
layer's input is no longer than its budget, nothing is dropped and the layer is exactly
Mamba's.

Row positions. Decimation is done by :class:`TokenDecimation`, a parameter-free submodule of
each decimating block (``model.layers[i].decimation``); its forward returns a
:class:`Decimation` with the kept rows' **original sequence positions** `(batch, n_kept)`
(ascending), their row indices, the kept input states and every row's score, so a forward hook
on it maps the block's output rows back to positions (capture code must do this: rows after a
decimating layer are not consecutive positions). The model's forward returns a
:class:`DeciMambaOutput`: ``logits`` `(batch, n_out, vocab)` **only for the positions that
survive every decimating layer**, ``positions`` `(batch, n_out)` saying which, and
``layer_positions`` (the positions of each ``hidden_states`` entry's rows). Dropped positions
get no logits at all (no placeholder values). Batch rows keep the same number of positions but
generally different ones.

Causality, honestly: which rows survive is a global top-k over the whole input, so a later
token can change whether an earlier one is kept, and with it the earlier logits. A DeciMamba
prefill is therefore **not causal** by construction (as in the paper, where decimation is
applied to a context that is read as a whole). With ``decimation=False``, or inputs no longer
than the budgets, it is exactly Mamba and causal (tested).

Cache and generation: every ``forward`` call decimates its own rows (a prefill), continuing
from ``cache`` when given; the cache then holds the states after the kept rows (each layer's
convolution state holds the last inputs it saw: all rows for layers up to the first
decimating one, kept rows after). ``step`` never decimates: generation after a prefill
proceeds exactly like Mamba over the kept states. Feeding a context in several chunks
decimates each chunk on its own, which differs from one call over the whole context.

Parameters are Mamba's, with the same names (:class:`TokenDecimation` has none), so
:meth:`DeciMambaLM.from_mamba` or any Mamba checkpoint gives a DeciMamba model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.kernels import selective_scan
from fidelity.models.base import CausalLM, LMOutput, ModelCache, conv_window
from fidelity.models.mamba import (
    MambaBlock,
    MambaConfig,
    MambaLayerCache,
    MambaLM,
    init_lm_weights,
)

DECIMATION_SCORES = ("mean", "norm")


@dataclass
class DeciMambaConfig(MambaConfig):
    """Mamba plus decimation settings (defaults of the authors' code unless noted)."""

    model_type = "decimamba"

    decimation: bool = True  # False: exactly Mamba
    decimating_layers: list[int] | None = None  # None: the middle layer (official: 12 of 24)
    decimation_base_length: int = 2000  # L_base, kept by the first decimating layer (official)
    decimation_beta: float = 0.5  # later decimating layer s keeps L_base * beta**s (official)
    decimation_min_length: int = 20  # no decimating layer keeps fewer rows (official)
    decimation_score: str = "mean"  # row importance: mean of delta over channels ("norm": L2)
    keep_last_tokens: int = 1  # last rows never dropped; 1 keeps the last token's logits

    @property
    def resolved_decimating_layers(self) -> list[int]:
        """Indices of the decimating layers, ascending (empty when decimation is off)."""
        if not self.decimation:
            return []
        if self.decimating_layers is None:
            return [self.n_layer // 2]
        return sorted(self.decimating_layers)

    def validate(self) -> None:
        super().validate()
        layers = self.decimating_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(layer, int) and 0 <= layer < self.n_layer for layer in layers
            ):
                raise ValueError(
                    f"decimating_layers must be a list of layer indices in [0, {self.n_layer}), "
                    f"got {layers!r}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"decimating_layers has repeated layers: {layers!r}")
        for name in ("decimation_base_length", "decimation_min_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.keep_last_tokens, int) or self.keep_last_tokens < 0:
            raise ValueError(
                f"keep_last_tokens must be a non-negative integer, got {self.keep_last_tokens!r}"
            )
        if not 0 < self.decimation_beta <= 1:
            raise ValueError(f"decimation_beta must lie in (0, 1], got {self.decimation_beta!r}")
        if self.decimation_score not in DECIMATION_SCORES:
            raise ValueError(
                f"decimation_score must be one of {DECIMATION_SCORES}, got "
                f"{self.decimation_score!r}"
            )


@dataclass
class Decimation:
    """What :class:`TokenDecimation` returns.

    ``states`` `(batch, n_kept, d_model)`: the kept rows of the block input; ``positions``
    `(batch, n_kept)` long: their original sequence positions, ascending; ``index``
    `(batch, n_kept)` long: their row indices in the block input; ``scores`` `(batch, n_in)`:
    every input row's importance.
    """

    states: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    scores: torch.Tensor


class TokenDecimation(nn.Module):
    """Keep the rows with the largest step sizes (no parameters).

    ``budget``: rows kept among those that may be dropped (at least ``min_length``); the last
    ``keep_last`` rows are always kept.
    """

    def __init__(self, budget: int, min_length: int, keep_last: int, score: str) -> None:
        super().__init__()
        self.budget = budget
        self.min_length = min_length
        self.keep_last = keep_last
        self.score = score

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, min_length={self.min_length}, keep_last={self.keep_last}, "
            f"score={self.score!r}"
        )

    def n_kept(self, n_rows: int) -> int:
        """How many of ``n_rows`` input rows survive."""
        droppable = max(n_rows - self.keep_last, 0)
        return min(droppable, max(self.budget, self.min_length)) + n_rows - droppable

    def forward(
        self, hidden: torch.Tensor, delta: torch.Tensor, positions: torch.Tensor
    ) -> Decimation:
        """``hidden`` `(batch, n, d_model)` (block input rows), ``delta`` `(batch, d_inner, n)`
        (step sizes after bias and softplus), ``positions`` `(batch, n)` (original positions of
        the rows) -> :class:`Decimation`."""
        batch, n_rows, d_model = hidden.shape
        if delta.shape[0] != batch or delta.shape[-1] != n_rows:
            raise ValueError(
                f"delta must be (batch, d_inner, n) matching hidden {tuple(hidden.shape)}, got "
                f"{tuple(delta.shape)}"
            )
        if positions.shape != (batch, n_rows):
            raise ValueError(f"positions must be {(batch, n_rows)}, got {tuple(positions.shape)}")
        if self.score == "mean":
            scores = delta.mean(dim=1)  # (batch, n)
        else:
            scores = torch.linalg.vector_norm(delta, dim=1)
        droppable = max(n_rows - self.keep_last, 0)
        n_kept_droppable = self.n_kept(n_rows) - (n_rows - droppable)
        if n_kept_droppable == droppable:
            index = torch.arange(n_rows, device=hidden.device).expand(batch, n_rows)
        else:
            best = scores[:, :droppable].topk(n_kept_droppable, dim=1).indices
            tail = torch.arange(droppable, n_rows, device=hidden.device).expand(batch, -1)
            index = torch.cat([best.sort(dim=1).values, tail], dim=1)  # (batch, n_kept)
        states = hidden.gather(1, index[..., None].expand(-1, -1, d_model))
        return Decimation(states, positions.gather(1, index), index, scores)


@dataclass
class KeptPositions:
    """Original sequence positions of the rows flowing through blocks that may drop rows.

    Each forward call (a chunk) enters the first block as consecutive positions
    ``start .. consumed - 1`` (:meth:`start_chunk`); a decimation keeps some rows
    (:meth:`keep`) and the blocks after it carry only those: ``positions`` `(batch, n_rows)`,
    ascending in each batch row. The model follows them through its forward; a capture follows
    them from outside, with hooks (:mod:`fidelity.probes.capture`).
    """

    positions: torch.Tensor | None = None
    start: int = 0
    consumed: int = 0

    def start_chunk(self, batch: int, n_rows: int, device: torch.device | str) -> None:
        """The first block receives a chunk of ``n_rows`` new positions for ``batch`` rows."""
        self.start = self.consumed
        self.consumed += n_rows
        positions = torch.arange(self.start, self.consumed, device=device)
        self.positions = positions.expand(batch, n_rows)

    def keep(self, index: torch.Tensor) -> None:
        """A decimation kept the rows ``index`` `(batch, n_kept)` of its input."""
        self.positions = self.positions.gather(1, index.to(self.positions.device))


@dataclass
class DeciMambaOutput(LMOutput):
    """``LMOutput`` plus where its rows come from.

    ``logits`` `(batch, n_out, vocab)` are for ``positions`` `(batch, n_out)` (the positions
    kept by every decimating layer, ascending); ``layer_positions`` holds ``n_layer + 1``
    tensors `(batch, n_l)`: the positions of the rows of ``hidden_states[l]``.
    """

    positions: torch.Tensor | None = None
    layer_positions: tuple[torch.Tensor, ...] | None = None


class DeciMambaBlock(MambaBlock):
    """Mamba's pre-norm residual block; with a ``decimation`` submodule it keeps only the
    best-scoring rows: `(batch, n, d_model)` -> `(batch, n_kept, d_model)`."""

    def __init__(self, config: DeciMambaConfig, decimation: TokenDecimation | None) -> None:
        super().__init__(config)
        self.decimation = decimation

    def forward(
        self,
        x: torch.Tensor,
        cache: MambaLayerCache | None = None,
        rows: KeptPositions | None = None,
    ) -> torch.Tensor:
        """``x`` `(batch, n, d_model)` -> `(batch, n_kept, d_model)` (``n_kept == n`` in
        layers that do not decimate); ``rows`` (positions of ``x``'s rows, default ``0..n-1``)
        is updated to the kept rows' positions; ``cache`` is advanced in place."""
        if self.decimation is None:
            return super().forward(x, cache)
        mixer = self.mixer
        inputs = mixer.ssm_inputs(self.norm(x), cache.conv if cache is not None else None)
        step_sizes = F.softplus(inputs["delta"] + mixer.dt_proj.bias[:, None])  # (b, d_in, n)
        if rows is None:
            rows = KeptPositions()
            rows.start_chunk(x.shape[0], x.shape[1], x.device)
        kept = self.decimation(x, step_sizes, rows.positions)
        rows.keep(kept.index)
        gather = kept.index[:, None, :]  # (batch, 1, n_kept), broadcast over channels

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, gather.expand(t.shape[0], t.shape[1], -1))

        y = selective_scan(
            take(inputs["u"]),
            take(inputs["delta"]),
            inputs["A"],
            take(inputs["B"]),
            take(inputs["C"]),
            mixer.D,
            z=take(inputs["z"]),
            delta_bias=mixer.dt_proj.bias,
            delta_softplus=True,
            return_last_state=cache is not None,
            initial_state=cache.ssm if cache is not None else None,
            backend=mixer.config.scan_backend,
        )
        if cache is not None:
            y, last_state = y
            cache.ssm = last_state.to(cache.ssm.dtype)
            cache.conv = conv_window(cache.conv, inputs["conv_input"])
        return kept.states + mixer.out_proj(y.transpose(1, 2))


class DeciMambaLM(MambaLM):
    """DeciMamba language model: ``input_ids`` `(batch, length)` -> :class:`DeciMambaOutput`
    with logits `(batch, n_out, vocab)` at ``positions`` `(batch, n_out)`."""

    config: DeciMambaConfig

    # Run policy: which rows survive is a global top-k over each forward call's input, so a
    # later token can change earlier logits, a context must be read in one call (each chunk
    # would be decimated on its own), and the logits cover the kept positions only.
    causal = False
    chunkable = False
    all_positions = False

    def __init__(self, config: DeciMambaConfig) -> None:
        # MambaLM.__init__ would build plain blocks; build ours in the same order (the same
        # random draws, so a seed gives the weights Mamba gets from it).
        CausalLM.__init__(self, config)
        decimating = config.resolved_decimating_layers
        self.layers = nn.ModuleList(
            DeciMambaBlock(config, self._decimation(config, decimating.index(i)))
            if i in decimating
            else DeciMambaBlock(config, None)
            for i in range(config.n_layer)
        )
        init_lm_weights(self)

    @staticmethod
    def _decimation(config: DeciMambaConfig, order: int) -> TokenDecimation:
        budget = int(config.decimation_base_length * config.decimation_beta**order)
        return TokenDecimation(
            budget, config.decimation_min_length, config.keep_last_tokens, config.decimation_score
        )

    @classmethod
    def from_mamba(cls, mamba: MambaLM, **decimation) -> DeciMambaLM:
        """DeciMamba with ``mamba``'s weights (copied) and ``decimation`` settings (any
        :class:`DeciMambaConfig` field beyond Mamba's, e.g. ``decimation_base_length=512``);
        same device, dtype and train/eval mode."""
        if not isinstance(mamba, MambaLM) or not isinstance(mamba.config, MambaConfig):
            raise TypeError(
                f"from_mamba takes a MambaLM (or DeciMambaLM), got {type(mamba).__name__}"
            )
        mamba_fields = {f.name for f in dataclasses.fields(MambaConfig)}
        shared = {k: v for k, v in dataclasses.asdict(mamba.config).items() if k in mamba_fields}
        config = DeciMambaConfig(**shared).replace(**decimation)
        weight = mamba.embedding.weight
        with torch.random.fork_rng(devices=[]):
            model = cls(config).to(device=weight.device, dtype=weight.dtype)
        model.load_state_dict(mamba.state_dict())
        model.train(mamba.training)
        provenance = getattr(mamba, "provenance", None)
        if provenance is not None:
            model.provenance = {**provenance, "name": "decimamba", "base": provenance.get("name")}
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: ModelCache | None = None,
        output_hidden_states: bool = False,
    ) -> DeciMambaOutput:
        """Logits at the surviving positions of ``input_ids`` `(batch, length)`; with ``cache``
        the sequence continues from it (positions count on from ``cache.position``)."""
        input_ids = self._check_input_ids(input_ids)
        x = self.embedding(input_ids)
        hidden = [x] if output_hidden_states else None
        x, layer_positions = self._run_blocks(x, cache, hidden)
        logits = self.lm_head(self.norm_f(x))[..., : self.config.vocab_size]
        return DeciMambaOutput(
            logits=logits,
            hidden_states=tuple(hidden) if hidden else None,
            positions=layer_positions[-1],
            layer_positions=tuple(layer_positions),
        )

    def _run_blocks(
        self, x: torch.Tensor, cache: ModelCache | None, hidden: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every block over ``x`` `(batch, length, d_model)`; returns the last block's output
        and the positions of every layer's rows (``n_layer + 1`` tensors `(batch, n_l)`)."""
        batch, length, _ = x.shape
        start = cache.position if cache is not None else 0
        rows = KeptPositions(consumed=start)
        rows.start_chunk(batch, length, x.device)
        layer_positions = [rows.positions]
        for index, layer in enumerate(self.layers):
            x = layer(x, cache.layers[index] if cache is not None else None, rows)
            layer_positions.append(rows.positions)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.position += length
        return x, layer_positions

    def _forward_blocks(self, x, cache, hidden):
        return self._run_blocks(x, cache, hidden)[0]
