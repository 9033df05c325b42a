"""``analyze()`` and ``compare()``: the one place that runs a probe through capture and the
metrics and assembles a :class:`~fidelity.results.FidelityResult` (the CLI and notebooks both
call it).

One analysis = one probe input (``batch x length`` tokens), one forward pass (chunk by chunk
through the recurrent cache for long inputs, so memory grows with the kept positions only),
hooks keeping every layer at the sampled anchors and anchor + distance positions, and the
metrics computed from what was kept (``position_loss`` reads that pass's logits). Metrics that
need more than that pass (``influence``, ``retrieval``, ``perplexity``, ``effrem``,
``context_probe``) run their own forward passes, as documented in their modules; those that
state their cost (:attr:`MetricRunner.cost`) have it printed with the plan.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from numbers import Integral
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

import pandas as pd
import psutil
import torch
from torch import nn

from fidelity.budget import (
    RunEstimate,
    check_fits,
    estimate_run,
    estimate_seconds,
    forward_cost,
)
from fidelity.devices import resolve_device
from fidelity.errors import InputError
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.eclmf import eclmf
from fidelity.metrics.etmf import etmf_frame, etmf_per_anchor, etmf_summary
from fidelity.metrics.sampling import (
    DEFAULT_DISTANCES_PER_OCTAVE,
    default_distances,
    required_positions,
    sample_anchors,
    seeded_generator,
)
from fidelity.metrics.toolkit import check_chunk_size, is_causal, resolve_chunk_size
from fidelity.models.base import CausalLM
from fidelity.models.loading import load_model
from fidelity.probes.capture import capture, find_blocks
from fidelity.probes.capture_types import Capture
from fidelity.probes.tasks import TASKS, make_probe
from fidelity.progress import ProgressReporter, as_reporter
from fidelity.results import Comparison, FidelityResult
from fidelity.schema import SUMMARY_COLUMNS

RETRIEVAL_TRIALS = 5
"""Prompts per (task, length, depth) cell of the ``retrieval`` metric."""
CENTERED = True
""":func:`analyze` takes read-out cosines about the read-out's intercept (``centered=True`` of
the ETMF and ECLMF functions, whose own default is DESIGN.md's uncentred formula; see README,
"What is measured"): the uncentred cosine lets a mean direction shared by all embeddings
dominate far predictions and understates half-lives by 15-30% on a linear recurrence with known
decay."""
KEY_DISTANCES = (1, 16, 256, 4096, 65536)
"""Distances whose normalized ETMF the summary lists (those within the run's range)."""
MAX_LENGTH = 2**62
"""Longest input: positions are int64 tensors (a longer one is refused with one line)."""
MIN_LENGTH = 16
"""Shortest analysis: as many positions as the fewest anchors allowed (ECLMF needs 8 or more)."""
STORE_FLOAT16_ABOVE = 1 << 30
"""Kept states are stored in float16 when float32 would take more than this many bytes."""


@dataclass
class AnalysisPlan:
    """What a run will do, decided before any forward pass (and shown by the CLI)."""

    length: int
    batch: int
    anchors: torch.Tensor
    distances: torch.Tensor
    positions: torch.Tensor
    layers: list[int]
    chunk_size: int | None
    store_dtype: torch.dtype
    estimate: RunEstimate
    seconds: float | None
    extra_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens per sequence that metrics running their own passes will feed the model, by
    metric (those that state it: see :attr:`MetricRunner.cost`)."""

    def describe(self) -> str:
        chunks = f"chunks of {self.chunk_size}" if self.chunk_size else "one pass"
        seconds = f", forward ~{self.seconds:.0f} s" if self.seconds is not None else ""
        return (
            f"{self.batch} x {format_length(self.length)} tokens ({chunks}); "
            f"{len(self.anchors)} anchors x {len(self.distances)} distances -> "
            f"{len(self.positions)} positions x {len(self.layers)} layers kept; "
            f"{self.estimate.describe()}{seconds}{self._extra()}"
        )

    def _extra(self) -> str:
        """The added cost of the metrics that run their own passes, in forward passes' worth
        of tokens (and seconds, when the forward was timed)."""
        parts = []
        for name, tokens in self.extra_tokens.items():
            ratio = tokens / self.length
            text = f"{name} +{format_length(tokens)} tokens/sequence (~{ratio:.1f} forwards"
            if self.seconds is not None:
                text += f", ~{self.seconds * ratio:.0f} s"
            parts.append(text + ")")
        return "; " + "; ".join(parts) if parts else ""


# -- metrics: one runner per metric ------------------------------------------------------------
@dataclass
class MetricContext:
    """What a metric's runner gets inside :func:`analyze`.

    ``input_ids`` `(batch, length)` is the probe input; ``options`` the run's definition
    (``seed``, ``n_boot``, ...), ``plan`` its anchors, distances and layers; ``capture`` holds
    every layer in ``plan.layers`` at ``plan.positions`` (None until the forward pass has run);
    ``observed`` holds what each metric's ``observe`` hook returned, by metric name; a runner
    that has a per-layer summary sets ``summary``; ``notes`` collects lines for the run's
    ``meta``.
    """

    model: nn.Module
    input_ids: torch.Tensor
    options: AnalysisOptions
    plan: AnalysisPlan
    reporter: ProgressReporter
    notes: list[str] = field(default_factory=list)
    capture: Capture | None = None
    observed: dict[str, object] = field(default_factory=dict)
    summary: pd.DataFrame | None = None


@dataclass(frozen=True)
class MetricRunner:
    """How :func:`analyze` runs one metric.

    ``compute(context)`` returns the metric's tidy frames (columns
    :data:`~fidelity.schema.TIDY_COLUMNS`, optionally ``length`` and ``depth``) once the
    captured forward pass has run. ``observe(model, plan)``, when given, returns a context
    manager entered around that forward pass (hooks that see it, as ``ssm_decay``'s); what it
    yields is ``context.observed[name]``; a ``TypeError`` from it (an unsupported model) skips
    the metric with a note. ``from_capture``: False for metrics that run forward passes of
    their own (opt-in: they cost more than the capture). ``default``: computed when the user
    names no metrics. ``cost(model, length)``: the tokens per sequence such a metric's own
    passes feed ``model`` (None: any model) for an input of ``length``, printed with the plan.
    """

    compute: Callable[[MetricContext], list[pd.DataFrame]]
    observe: Callable[[nn.Module, AnalysisPlan], AbstractContextManager] | None = None
    from_capture: bool = True
    default: bool = False
    cost: Callable[[nn.Module | None, int], int] | None = None
    """Tokens per sequence the metric's own passes feed the model for an input of the given
    length (shown in the plan before the run)."""


def _run_etmf(context: MetricContext) -> list[pd.DataFrame]:
    step = context.reporter.start("ETMF read-outs", 1)
    per_anchor = etmf_per_anchor(
        context.capture,
        context.plan.anchors,
        context.plan.distances,
        context.plan.layers,
        _input_embedding(context.model),
        seed=context.options.seed,
        centered=CENTERED,
    )
    frame = etmf_frame(per_anchor, n_boot=context.options.n_boot, seed=context.options.seed)
    context.summary = _summary(
        etmf_summary(per_anchor, n_boot=context.options.n_boot, seed=context.options.seed), frame
    )
    step.update(1)
    return [frame]


def _run_eclmf(context: MetricContext) -> list[pd.DataFrame]:
    step = context.reporter.start("ECLMF read-outs", 1)
    frame = eclmf(
        context.capture,
        context.plan.anchors,
        n_boot=context.options.n_boot,
        seed=context.options.seed,
        centered=CENTERED,
    )
    step.update(1)
    return [frame]


def _observe_ssm_decay(model: nn.Module, plan: AnalysisPlan) -> AbstractContextManager:
    from fidelity.metrics.ssm_decay import collect_ssm_decay

    return collect_ssm_decay(model, plan.anchors, plan.distances, plan.length, plan.layers)


def _run_ssm_decay(context: MetricContext) -> list[pd.DataFrame]:
    collector = context.observed["ssm_decay"]
    frame = collector.frame(n_boot=context.options.n_boot, seed=context.options.seed)
    context.notes.extend(collector.notes)
    return [frame]


def _run_influence(context: MetricContext) -> list[pd.DataFrame]:
    from fidelity.metrics.influence import influence

    plan = context.plan
    step = context.reporter.start("influence (perturbations)", 1)
    try:
        frame = influence(
            context.model,
            context.input_ids,
            plan.anchors,
            plan.distances,
            plan.layers,
            seed=context.options.seed,
            n_boot=context.options.n_boot,
        )
    except TypeError as error:
        context.notes.append(f"influence skipped: {error}")
        return []
    step.update(1)
    return [frame]


def _run_retrieval(context: MetricContext) -> list[pd.DataFrame]:
    """Passkey and key-value retrieval at doubling context lengths up to the analysis length."""
    from fidelity.metrics.retrieval import retrieval_accuracy

    frames = []
    for task in ("passkey", "kv"):
        step = context.reporter.start(f"{task} retrieval", 1)
        frames.append(
            retrieval_accuracy(
                context.model,
                task,
                lengths=context_lengths(context.plan.length),
                trials=RETRIEVAL_TRIALS,
                seed=context.options.seed,
                n_boot=context.options.n_boot,
            )
        )
        step.update(1)
    return frames


def _run_perplexity(context: MetricContext) -> list[pd.DataFrame]:
    """Held-out perplexity at doubling context lengths up to the analysis length."""
    from fidelity.metrics.perplexity import perplexity

    step = context.reporter.start("perplexity", 1)
    lengths = context_lengths(context.plan.length)
    frame = perplexity(
        context.model, lengths, seed=context.options.seed, n_boot=context.options.n_boot
    )
    step.update(1)
    return [frame]


def _observe_position_loss(model: nn.Module, plan: AnalysisPlan) -> AbstractContextManager:
    from fidelity.metrics.position_loss import observe_position_loss

    return observe_position_loss(model, plan.length, plan.batch)


def _run_position_loss(context: MetricContext) -> list[pd.DataFrame]:
    collector = context.observed["position_loss"]
    return [collector.frame(n_boot=context.options.n_boot, seed=context.options.seed)]


def _observe_memmamba_memory(model: nn.Module, plan: AnalysisPlan) -> AbstractContextManager:
    from fidelity.metrics.memmamba_memory import observe_memmamba_memory

    return observe_memmamba_memory(model, (plan.batch, plan.length))


def _run_memmamba_memory(context: MetricContext) -> list[pd.DataFrame]:
    """MemMamba's writes, firing, note ages and zeroed-memory loss (see
    :mod:`fidelity.metrics.memmamba_memory`); nothing for other models."""
    from fidelity.metrics.memmamba_memory import memmamba_memory, zeroed_tokens

    observation = context.observed["memmamba_memory"]
    if observation is None:
        return []
    plan = context.plan
    tokens = zeroed_tokens(context.model, plan.length)
    if tokens < plan.length:
        context.notes.append(
            f"memmamba_memory: the zeroed-memory loss covers the first {format_length(tokens)} "
            f"of {format_length(plan.length)} tokens (one extra forward of that prefix)"
        )
    step = context.reporter.start("MemMamba memory (zeroed-memory pass)", tokens)
    return memmamba_memory(
        context.model,
        context.input_ids,
        observation,
        plan.anchors,
        plan.layers,
        chunk_size=plan.chunk_size,
        n_boot=context.options.n_boot,
        seed=context.options.seed,
        progress=lambda done, _total: step.update(done),
    )


def _run_cut_context(
    context: MetricContext, label: str, metric: Callable[..., pd.DataFrame], tokens: int
) -> list[pd.DataFrame]:
    """Run an output-level ``metric`` that feeds cut contexts (``tokens`` in all) itself."""
    step = context.reporter.start(label, tokens)
    frame = metric(
        context.model,
        context.input_ids,
        chunk_size=context.options.chunk_size,
        seed=context.options.seed,
        n_boot=context.options.n_boot,
        progress=lambda done, _total: step.update(done),
    )
    return [frame]


def _run_effrem(context: MetricContext) -> list[pd.DataFrame]:
    """Effective remembrance at log-spaced (end, cut) pairs (see :mod:`fidelity.metrics.effrem`)."""
    from fidelity.metrics.effrem import effrem, effrem_tokens

    total = effrem_tokens(context.plan.length, causal=is_causal(context.model))
    return _run_cut_context(context, "effective remembrance", effrem, total)


def _run_context_probe(context: MetricContext) -> list[pd.DataFrame]:
    """Context-length probing (see :mod:`fidelity.metrics.context_probe`)."""
    from fidelity.metrics.context_probe import context_probe, context_probe_tokens

    total = context_probe_tokens(context.plan.length)
    return _run_cut_context(context, "context-length probing", context_probe, total)


def _effrem_cost(model: nn.Module | None, length: int) -> int:
    from fidelity.metrics.effrem import effrem_tokens

    return effrem_tokens(length, causal=model is None or is_causal(model))


def _zeroed_cost(model: nn.Module | None, length: int) -> int:
    from fidelity.metrics.memmamba_memory import zeroed_tokens

    return zeroed_tokens(model, length)


def _context_probe_cost(model: nn.Module | None, length: int) -> int:
    del model  # every target's window is a call of its own, whatever the model
    from fidelity.metrics.context_probe import context_probe_tokens

    return context_probe_tokens(length)


METRIC_RUNNERS: dict[str, MetricRunner] = {
    "etmf": MetricRunner(_run_etmf, default=True),
    "eclmf": MetricRunner(_run_eclmf, default=True),
    "ssm_decay": MetricRunner(_run_ssm_decay, observe=_observe_ssm_decay, default=True),
    "influence": MetricRunner(_run_influence, from_capture=False),
    "retrieval": MetricRunner(_run_retrieval, from_capture=False),
    "perplexity": MetricRunner(_run_perplexity, from_capture=False),
    "position_loss": MetricRunner(_run_position_loss, observe=_observe_position_loss, default=True),
    "memmamba_memory": MetricRunner(
        _run_memmamba_memory, observe=_observe_memmamba_memory, default=True, cost=_zeroed_cost
    ),
    "effrem": MetricRunner(_run_effrem, from_capture=False, cost=_effrem_cost),
    "context_probe": MetricRunner(_run_context_probe, from_capture=False, cost=_context_probe_cost),
}
"""Every metric :func:`analyze` knows, in the order it computes them (and its frame lists
them); adding a metric is one module under :mod:`fidelity.metrics` plus one entry here."""
METRICS = tuple(METRIC_RUNNERS)
CAPTURE_METRICS = tuple(name for name, runner in METRIC_RUNNERS.items() if runner.from_capture)
"""Metrics computed from the single captured forward pass."""
EXTRA_METRICS = tuple(name for name, runner in METRIC_RUNNERS.items() if not runner.from_capture)
"""Metrics that run forward passes of their own (opt-in: they cost more than the capture)."""
DEFAULT_METRICS = tuple(name for name, runner in METRIC_RUNNERS.items() if runner.default)


@dataclass(frozen=True)
class AnalysisOptions:
    """One run's definition: everything :func:`analyze` needs beside the model, validated on
    construction (``InputError``, exit 2 on the command line; ``TypeError`` for a wrong type).

    The CLI, the notebook API (:func:`analyze`'s keyword arguments) and sweeps
    (:class:`fidelity.sweep.RunSpec`) all build one and pass it to :func:`run_analysis`.
    ``length`` in tokens (``"60k"`` accepted, stored as an int); ``probe`` one of
    :data:`fidelity.probes.tasks.TASKS`; ``metrics`` names from :data:`METRICS` (a list or a
    comma-separated string, stored as a tuple); ``anchors`` sampled positions (>= 16, seeded);
    ``distances`` (None: log-spaced up to the length) and ``layers`` (None: all; 0 is always
    kept) stored as tuples; ``seed`` for the probe, anchors and bootstraps; ``batch`` sequences;
    ``device`` "auto", "cpu", "cuda" or "cuda:N"; ``text`` files or directories for the text
    probe, ``text_field`` of ``.jsonl`` records; ``tokenizer`` a local Hugging Face tokenizer
    directory; ``chunk_size`` "auto", None or a token count; ``max_memory`` bytes overriding the
    available-memory check; ``n_boot`` bootstrap replicates (0: no intervals).
    """

    length: int | str = "8k"
    probe: str = "text"
    metrics: Sequence[str] | str = DEFAULT_METRICS
    anchors: int = 512
    distances: Sequence[int] | None = None
    layers: Sequence[int] | None = None
    seed: int = 0
    batch: int = 1
    device: str = "auto"
    text: str | Path | Sequence[str | Path] | None = None
    text_field: str = "text"
    tokenizer: str | Path | None = None
    chunk_size: int | str | None = "auto"
    max_memory: int | None = None
    n_boot: int = 200

    def __post_init__(self) -> None:
        length = check_length(self.length)
        if length > MAX_LENGTH:
            raise InputError(f"length {length} is beyond the longest input, {MAX_LENGTH} tokens")
        if self.probe not in TASKS:
            raise InputError(f"unknown probe {self.probe!r}; choose from {', '.join(TASKS)}")
        _check_int("anchors", self.anchors, 16)
        _check_int("batch", self.batch, 1)
        _check_int("seed", self.seed, 0)
        _check_int("n_boot", self.n_boot, 0)
        if self.layers is not None and (
            isinstance(self.layers, str | bytes)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)
        ):
            raise TypeError(
                f"layers must be a list of layer indices such as [0, 3] (or None for all), got "
                f"{self.layers!r}"
            )
        distances = None
        if self.distances is not None:
            distances = tuple(int(d) for d in self.distances)
            if not distances or min(distances) < 0 or max(distances) >= length:
                raise InputError(
                    f"distances must lie in [0, {length}), got {sorted(set(distances))}"
                )
        check_chunk_size(self.chunk_size)
        for name in check_metrics(self.metrics):
            cost = METRIC_RUNNERS[name].cost
            if cost is not None and cost(None, length) == 0:
                raise InputError(f"length {length} is too short for the {name} metric")
        if self.max_memory is not None:
            _check_int("max_memory", self.max_memory, 1)
        text = self.text
        if text is not None and not isinstance(text, str | Path):
            text = tuple(text)
        normalized = {
            "length": length,
            "metrics": tuple(check_metrics(self.metrics)),
            "distances": distances,
            "layers": None if self.layers is None else tuple(self.layers),
            "text": text,
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def probe_options(self) -> dict[str, object]:
        """Keyword arguments of :func:`~fidelity.probes.tasks.make_probe` beyond the length,
        batch, seed and tokenizer."""
        if self.probe == "text" and self.text is not None:
            return {"paths": self.text, "text_field": self.text_field}
        return {}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}")


def _resolve_model(model: nn.Module | str | Path) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model)
    raise TypeError(
        f"model must be an nn.Module, a model name or a checkpoint directory; got {model!r}"
    )


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """The metric names in ``metrics`` (a list or a comma-separated string), validated."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise InputError(
            f"unknown metrics {unknown or metrics!r}; choose from {', '.join(METRICS)}"
        )
    return list(dict.fromkeys(metrics))


def check_length(length: int | str) -> int:
    """``length`` in tokens (see :func:`~fidelity.lengths.parse_length`), at least
    :data:`MIN_LENGTH`."""
    length = parse_length(length)
    if length < MIN_LENGTH:
        raise InputError(
            f"length {length} is too short to measure forgetting; give at least {MIN_LENGTH} "
            "tokens (e.g. 8k)"
        )
    return length


def _n_blocks(model: nn.Module) -> int:
    return len(find_blocks(model))


def _input_embedding(model: nn.Module) -> torch.Tensor | None:
    if isinstance(model, CausalLM):
        return model.embedding.weight.detach()
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if getter is not None else None
    return module.weight.detach() if module is not None else None


def _most_default_distances(length: int) -> int:
    """An upper bound on ``len(default_distances(length, ...))`` that builds no tensor: 0 plus
    at most ``per_octave`` distances per octave up to ``length``."""
    return 1 + DEFAULT_DISTANCES_PER_OCTAVE * (length.bit_length() + 1)


def plan_analysis(
    model: nn.Module,
    length: int | str,
    *,
    anchors: int = 512,
    distances: Sequence[int] | torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    batch: int = 1,
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    max_memory: int | None = None,
    time_it: bool = True,
) -> AnalysisPlan:
    """:func:`plan_run` for the :class:`AnalysisOptions` these arguments make."""
    if isinstance(distances, torch.Tensor):
        distances = distances.tolist()
    options = AnalysisOptions(
        length,
        anchors=anchors,
        distances=distances,
        layers=layers,
        batch=batch,
        seed=seed,
        chunk_size=chunk_size,
        max_memory=max_memory,
    )
    return plan_run(model, options, time_it=time_it)


def plan_run(model: nn.Module, options: AnalysisOptions, *, time_it: bool = True) -> AnalysisPlan:
    """Decide anchors, distances, kept positions, chunking and storage for ``options`` on
    ``model``, estimate memory and time, and refuse (``MemoryBudgetError``) when the run will
    not fit."""
    length, anchors, layers, batch = options.length, options.anchors, options.layers, options.batch
    distances, max_memory = options.distances, options.max_memory
    n_blocks = _n_blocks(model)
    chosen_layers = sorted(set(range(n_blocks + 1) if layers is None else layers) | {0})
    bad = [layer for layer in chosen_layers if not 0 <= layer <= n_blocks]
    if bad:
        raise InputError(f"layers {bad} out of range: this model has layers 0..{n_blocks}")
    chunk_size = resolve_chunk_size(model, options.chunk_size, length)
    readout_threads = torch.get_num_threads() if "etmf" in options.metrics else 1
    # Refuse before anything as long as the input is allocated (the anchor draw permutes every
    # position), with at most every anchor at every distance kept.
    n_distances = len(distances) if distances is not None else _most_default_distances(length)
    early = estimate_run(
        model,
        length,
        batch=batch,
        n_positions=min(length, min(anchors, length) * (n_distances + 1)),
        n_layers_kept=len(chosen_layers),
        store_bytes=4,
        chunk_size=chunk_size,
        readout_threads=readout_threads,
    )
    if early.kept_states > STORE_FLOAT16_ABOVE:
        early.kept_states //= 2
    check_fits(early, max_memory)
    anchor_positions = sample_anchors(length, anchors, seeded_generator(options.seed, 1))
    if distances is None:
        distance_tensor = default_distances(length, len(anchor_positions))
    else:
        distance_tensor = torch.tensor(distances, dtype=torch.long).unique(sorted=True)
    positions = required_positions(anchor_positions, distance_tensor, length)
    estimate = estimate_run(
        model,
        length,
        batch=batch,
        n_positions=len(positions),
        n_layers_kept=len(chosen_layers),
        store_bytes=4,
        chunk_size=chunk_size,
        readout_threads=readout_threads,
    )
    store_dtype = torch.float32
    if estimate.kept_states > STORE_FLOAT16_ABOVE:
        store_dtype = torch.float16
        estimate.kept_states //= 2
    check_fits(estimate, max_memory)
    seconds = None
    if time_it:
        cost = forward_cost(model, probe_tokens=min(1024, length))
        seconds = estimate_seconds(model, length, batch, cost)
    extra_tokens = {
        name: METRIC_RUNNERS[name].cost(model, length)
        for name in options.metrics
        if METRIC_RUNNERS[name].cost is not None
        and METRIC_RUNNERS[name].cost(model, length) > 0  # 0: nothing to run for this model
    }
    return AnalysisPlan(
        length,
        batch,
        anchor_positions,
        distance_tensor,
        positions,
        chosen_layers,
        chunk_size,
        store_dtype,
        estimate,
        seconds,
        extra_tokens,
    )


def analyze(
    model: nn.Module | str | Path,
    length: int | str = "8k",
    probe: str = "text",
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    anchors: int = 512,
    distances: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool | ProgressReporter = True,
    *,
    batch: int = 1,
    text: str | Path | Sequence[str | Path] | None = None,
    text_field: str = "text",
    tokenizer: str | Path | None = None,
    chunk_size: int | str | None = "auto",
    max_memory: int | None = None,
    n_boot: int = 200,
    name: str | None = None,
) -> FidelityResult:
    """Measure how ``model`` forgets on one probe input and return a :class:`FidelityResult`.

    ``model``: one of our models, a Hugging Face causal LM, a registered name or a checkpoint
    directory. ``length``: tokens per sequence (``"60k"``). ``probe``: text | passkey | kv |
    random | induction | selective_copy | mqar (``text`` reads all of the ``text`` files or
    directories, ``.jsonl`` records' field ``text_field``; else the held-out default
    standard-library corpus; the memory tasks use their default options).
    ``metrics``: any of etmf, eclmf, ssm_decay, position_loss, memmamba_memory (from the
    captured pass; the last one MemMamba only, with one extra forward over at most 8k tokens),
    influence, retrieval (passkey and key-value accuracy at doubling context lengths up to
    ``length``), perplexity, effrem (effective remembrance), context_probe (context-length
    probing); the last two run sampled passes of their own whose cost the plan states.
    ``anchors`` positions are sampled (seeded) and scored at log-spaced ``distances``;
    ``layers`` (default all; 0 = embeddings is always included). ``progress``: True for
    progress bars, False for none, or a reporter. ``max_memory`` (bytes) overrides the
    available-memory check. The result's ``frame`` is tidy (see :mod:`fidelity.results`),
    ``summary`` has per-layer statistics of the normalized ETMF curve (farthest distance at or
    above 0.5, peak distance, memory mass, contiguous length, half-life with its fit's R^2;
    see :data:`fidelity.schema.SUMMARY_COLUMNS`), ``meta`` records everything needed to
    reproduce the run. The arguments make an :class:`AnalysisOptions` (validated before the
    model is loaded), run by :func:`run_analysis`.
    """
    options = AnalysisOptions(
        length,
        probe,
        metrics,
        anchors,
        distances,
        layers,
        seed,
        batch=batch,
        device=device,
        text=text,
        text_field=text_field,
        tokenizer=tokenizer,
        chunk_size=chunk_size,
        max_memory=max_memory,
        n_boot=n_boot,
    )
    return run_analysis(model, options, progress=progress, name=name)


def run_analysis(
    model: nn.Module | str | Path,
    options: AnalysisOptions,
    *,
    progress: bool | ProgressReporter = True,
    name: str | None = None,
) -> FidelityResult:
    """Run the analysis ``options`` defines on ``model`` (see :func:`analyze`); ``name``
    labels the model in the result (default: its registered name or class)."""
    if not isinstance(options, AnalysisOptions):
        raise TypeError(f"options must be AnalysisOptions, got {type(options).__name__}")
    started = time.perf_counter()
    target = resolve_device(options.device)
    model = _resolve_model(model)
    model = model.to(target).eval()
    reporter = as_reporter(progress)
    try:
        plan = plan_run(model, options, time_it=False)
        probe_options = options.probe_options()
        if options.probe == "random" and _vocabulary_size(model) is not None:
            probe_options["vocab_size"] = _vocabulary_size(model)  # draw what the model reads
        probe_input = make_probe(
            options.probe,
            plan.length,
            batch=options.batch,
            seed=options.seed,
            tokenizer=options.tokenizer,
            **probe_options,
        )
        _check_vocabulary(model, probe_input.input_ids)
        context = MetricContext(model, probe_input.input_ids, options, plan, reporter)
        forward = reporter.start("forward pass", plan.length)
        with contextlib.ExitStack() as stack:
            _observe(stack, context)
            context.capture = capture(
                model,
                probe_input.input_ids,
                layers=plan.layers,
                positions=plan.positions,
                dtype=plan.store_dtype,
                chunk_size=plan.chunk_size,
                progress=lambda done, _total: forward.update(done),
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames = _compute_metrics(context)
        notes = context.notes
        notes.extend(sorted({str(w.message) for w in caught}))
    finally:
        reporter.close()
    model_name = name or _model_name(model)
    checkpoint = _checkpoint_label(_provenance(model))
    frame = _finish_frame(frames, model_name, checkpoint, plan.length)
    summary = context.summary if context.summary is not None else _empty_summary(plan.layers)
    summary.insert(0, "checkpoint", checkpoint)
    summary.insert(0, "model", model_name)
    meta = _meta(model, model_name, checkpoint, options, plan, target, notes)
    meta["wall_time_s"] = round(time.perf_counter() - started, 2)
    meta["peak_memory_bytes"] = peak_memory_bytes()
    return FidelityResult(frame, summary, meta)


def _observe(stack: contextlib.ExitStack, context: MetricContext) -> None:
    """Enter the ``observe`` hooks of the chosen metrics around the captured forward pass."""
    for name in context.options.metrics:
        runner = METRIC_RUNNERS[name]
        if runner.observe is None:
            continue
        try:
            context.observed[name] = stack.enter_context(
                runner.observe(context.model, context.plan)
            )
        except TypeError as error:
            context.notes.append(f"{name} skipped: {error}")


def _compute_metrics(context: MetricContext) -> list[pd.DataFrame]:
    """The frames of the chosen metrics, in :data:`METRIC_RUNNERS` order (a metric whose
    ``observe`` hook refused the model is left out)."""
    frames = []
    for name, runner in METRIC_RUNNERS.items():
        chosen = name in context.options.metrics
        if chosen and (runner.observe is None or name in context.observed):
            frames.extend(runner.compute(context))
    return frames


def peak_memory_bytes() -> int:
    """Peak resident memory of this process so far (current resident memory where the
    platform keeps no peak)."""
    if resource is not None:
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    return int(psutil.Process().memory_info().rss)


def context_lengths(length: int) -> list[int]:
    """Doubling context lengths from 1024 up to ``length`` (``length`` itself included)."""
    lengths = [n for n in (1024 * 2**k for k in range(12)) if n < length]
    return [*lengths, length]


def _empty_summary(layers: list[int]) -> pd.DataFrame:
    """Summary rows without ETMF (every statistic needs it): the layers, every value NaN."""
    columns = [c for c in SUMMARY_COLUMNS if SUMMARY_COLUMNS[c] == "float"]
    return pd.DataFrame({"layer": layers, **{column: float("nan") for column in columns}})


def _vocabulary_size(model: nn.Module) -> int | None:
    """The model's vocabulary size (``config.vocab_size``), None when it does not say."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _check_vocabulary(model: nn.Module, input_ids: torch.Tensor) -> None:
    vocab = _vocabulary_size(model)
    if vocab is not None and int(input_ids.max()) >= vocab:
        raise InputError(
            f"the probe's token ids go up to {int(input_ids.max())} but the model's vocabulary "
            f"has {vocab} entries; pass the model's tokenizer (tokenizer=DIR / --tokenizer DIR)"
        )


def _provenance(model: nn.Module) -> dict:
    return dict(getattr(model, "provenance", {}) or {})


def _checkpoint_label(provenance: dict) -> str:
    """``"shipped"`` for the package's default checkpoints, else the checkpoint's path."""
    if provenance.get("shipped_default"):
        return "shipped"
    return str(provenance.get("checkpoint") or "")


def _model_name(model: nn.Module) -> str:
    provenance = _provenance(model)
    if provenance.get("name"):
        return str(provenance["name"])
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _finish_frame(
    frames: list[pd.DataFrame], model: str, checkpoint: str, length: int
) -> pd.DataFrame:
    frame = pd.concat([f for f in frames if len(f)], ignore_index=True) if frames else None
    if frame is None or frame.empty:
        raise InputError("no metric produced any value; check the metrics and the length")
    frame.insert(0, "checkpoint", checkpoint)
    frame.insert(0, "model", model)
    # Only the long-context metrics have their own context lengths; the rest ran at `length`.
    frame["length"] = frame["length"].fillna(length) if "length" in frame else length
    if "depth" not in frame:
        frame["depth"] = float("nan")
    return frame


def _summary(curves: pd.DataFrame, etmf_rows: pd.DataFrame) -> pd.DataFrame:
    """The results' per-layer summary: the :data:`~fidelity.schema.SUMMARY_COLUMNS` of ETMF's
    curve summary (its fit parameters left out), with normalized ETMF at key distances."""
    columns = [c for c in SUMMARY_COLUMNS if c in curves.columns]
    summary = curves[columns].astype({c: float for c in columns if SUMMARY_COLUMNS[c] == "float"})
    normalized = etmf_rows[etmf_rows["metric"] == "etmf_norm"]
    for distance in KEY_DISTANCES:
        at = normalized[normalized["distance"] == distance].set_index("layer")["value"]
        if len(at):
            summary[f"etmf_norm@{distance}"] = summary["layer"].map(at)
    return summary


def _versions() -> dict[str, str]:
    try:
        ours = metadata.version("memory-fidelity")
    except metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return {
        "memory-fidelity": ours,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _meta(
    model: nn.Module,
    model_name: str,
    checkpoint: str,
    options: AnalysisOptions,
    plan: AnalysisPlan,
    device: torch.device,
    notes: list[str],
) -> dict:
    """The result's ``meta``: the model, the run's options as planned, versions, notes."""
    provenance = _provenance(model)
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    trained = bool(provenance.get("trained", not isinstance(model, CausalLM)))
    return {
        "model": model_name,
        "checkpoint": checkpoint,
        "checkpoint_path": str(provenance.get("checkpoint") or ""),
        "trained": trained,
        "random_init": not trained,
        "preset": provenance.get("preset"),
        "training_length": _training_length(provenance),
        "model_config": config_dict,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "probe": options.probe,
        "length": plan.length,
        "batch": plan.batch,
        "seed": options.seed,
        "anchors": len(plan.anchors),
        "distances": plan.distances.tolist(),
        "layers": plan.layers,
        "metrics": list(options.metrics),
        "chunk_size": plan.chunk_size,
        "centered_readout": CENTERED,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
    }


def _training_length(provenance: dict) -> int | None:
    """The sequence length the checkpoint was trained at (its ``meta.training.length``), None
    when its metadata does not say."""
    training = provenance.get("training")
    length = training.get("length") if isinstance(training, dict) else None
    return length if isinstance(length, int) and not isinstance(length, bool) else None


def compare(
    runs: Sequence[FidelityResult | str | Path], labels: Sequence[str] | None = None
) -> Comparison:
    """Line several results (or saved run directories) up: forgetting curves overlaid, per-
    layer summary statistics with differences against the first run."""
    if isinstance(runs, (str, Path, FidelityResult)):
        raise TypeError("compare() takes a list of results or run directories")
    if len(runs) < 1:
        raise InputError("compare() needs at least one run")
    return Comparison.from_runs(list(runs), labels)
