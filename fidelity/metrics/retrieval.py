"""Retrieval accuracy: passkey and key-value prompts, by context length and needle depth.

For each length and depth, ``trials`` prompts (:func:`fidelity.probes.tasks.make_probe`, one
seed per cell) end right before the answer. The model is scored on the answer's tokens:

- ``{task}_acc``: exact match of greedy decoding (as many tokens as the answer has), with a
  Wilson 95% interval over the trials;
- ``{task}_digit_acc``: the fraction of the answer's digit tokens (tokens whose text holds a
  digit; with bytes the 5 digits, not the leading space) predicted correctly given the correct
  earlier answer tokens (teacher forcing), with a percentile bootstrap interval over trials.

Both come from one teacher-forced decode: greedy decoding reproduces the answer exactly when,
and only when, every answer token is the argmax given the correct tokens before it (then the
greedy prefix *is* the correct prefix), so exact match needs no second decode (tested against
an explicit greedy loop). Our models prefill the prompt with a cache (in chunks of
``chunk_size`` for long prompts) and continue with ``model.step``; models without a cache
(Hugging Face) run one forward over the prompt plus the answer's first tokens, which is what
re-running the growing sequence computes. DeciMamba prefills in one call (decimating the
whole context, as in its paper; chunks would be decimated separately) and reads the logits of
the last position, which always survives decimation when ``keep_last_tokens >= 1``.

``distance`` is the number of tokens from the end of the needle to the end of the question
(the prompt's end), averaged over the trials of a cell and rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.lengths import parse_length
from fidelity.metrics.curves import DEFAULT_LEVEL, bootstrap_counts, mean_with_interval
from fidelity.metrics.toolkit import resolve_chunk_size, returns_all_positions, tidy_frame
from fidelity.models.base import CausalLM
from fidelity.probes.tasks import FILLERS, ProbeInput, make_probe
from fidelity.probes.tokenizer import Tokenizer, as_tokenizer
from fidelity.schema import TIDY_COLUMNS

RETRIEVAL_TASKS = ("passkey", "kv")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FRAME_COLUMNS = (*TIDY_COLUMNS, "length", "depth")
"""Columns of the frame: the tidy columns, the context length and the needle depth."""


def wilson_interval(successes: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` at ``level`` (two-sided)."""
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 and n successes the bound is exactly 0 (or 1); rounding in center - half must not
    # leave it a hair above the estimate
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _prefill(model: CausalLM, prompt: torch.Tensor, chunk: int | None):
    """Run ``prompt`` `(batch, length)` through a fresh cache; return (logits of the last
    position `(batch, vocab)`, cache)."""
    cache = model.init_cache(prompt.shape[0])
    length = prompt.shape[1]
    step = chunk if model.chunkable and chunk else length
    if not returns_all_positions(model):
        output = model(prompt, cache=cache)
        if int(output.positions[0, -1]) != length - 1:
            raise ValueError(
                f"{type(model).__name__} dropped the prompt's last position, so it has no "
                "next-token logits; use keep_last_tokens >= 1"
            )
        return output.logits[:, -1], cache
    for start in range(0, length, step):
        output = model(prompt[:, start : start + step], cache=cache)
    return _logits(output)[:, -1], cache


@torch.no_grad()
def teacher_forced_predictions(
    model: nn.Module, prompt: torch.Tensor, answers: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Argmax predictions for each answer token given the prompt and the correct earlier answer
    tokens.

    ``prompt`` `(batch, length)`, ``answers`` `(batch, n)` -> `(batch, n)` long: entry ``k`` is
    the model's most likely token after ``prompt + answers[:, :k]`` (the argmax of
    :func:`teacher_forced_logits`).
    """
    return teacher_forced_logits(model, prompt, answers, chunk_size).argmax(-1)


@torch.no_grad()
def teacher_forced_logits(
    model: nn.Module, prompt: torch.Tensor, answers: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Next-token logits at each answer token given the prompt and the correct earlier answer
    tokens.

    ``prompt`` `(batch, length)`, ``answers`` `(batch, n)` -> `(batch, n, vocab)`: entry ``k``
    holds the logits after ``prompt + answers[:, :k]``. Our models: prefill with a cache
    (chunks of ``chunk_size``), then ``model.step``; others: one forward over
    ``prompt + answers[:, :-1]``.
    """
    device = _device(model)
    prompt, answers = prompt.to(device), answers.to(device)
    n = answers.shape[1]
    if not isinstance(model, CausalLM):
        sequence = torch.cat([prompt, answers[:, :-1]], dim=1)
        return _logits(model(sequence))[:, -n:]
    logits, cache = _prefill(model, prompt, chunk_size)
    steps = [logits]
    for k in range(1, n):
        steps.append(model.step(answers[:, k - 1], cache))
    return torch.stack(steps, dim=1)


def _padded_answers(probe: ProbeInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer ids `(batch, n_max)` (short rows padded with their last token) and a mask of
    the real entries `(batch, n_max)`."""
    n_max = max(len(ids) for ids in probe.answer_ids)
    ids = torch.tensor([list(a) + [a[-1]] * (n_max - len(a)) for a in probe.answer_ids])
    mask = torch.tensor([[k < len(a) for k in range(n_max)] for a in probe.answer_ids])
    return ids, mask


def _digit_mask(answers: torch.Tensor, real: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Which answer tokens hold a digit `(batch, n)` (all real tokens if none does)."""
    digits = torch.tensor(
        [
            [any(ch.isdigit() for ch in tokenizer.decode([tok])) for tok in row]
            for row in answers.tolist()
        ]
    )
    digits &= real
    return torch.where(digits.any(dim=1, keepdim=True), digits, real)


def _check_filler(task: str, filler: str | None) -> dict[str, str]:
    """The probe options ``filler`` asks for: ``{"filler": ...}`` for passkey, ``{}`` when
    None; a filler for kv (whose padding is always the standard sentence) is refused."""
    if filler is None:
        return {}
    if task != "passkey":
        raise InputError(f"filler applies to the passkey task only, not to {task!r}")
    if filler not in FILLERS:
        raise InputError(f"filler must be one of {', '.join(FILLERS)}, got {filler!r}")
    return {"filler": filler}


def _check_options(task, lengths, depths, trials) -> tuple[list[int], list[float], int]:
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"task must be one of {RETRIEVAL_TASKS}, got {task!r}")
    if isinstance(lengths, (str, int)):
        lengths = [lengths]
    if isinstance(depths, Real):
        depths = [depths]
    parsed = [parse_length(length) for length in lengths]
    if not parsed or not list(depths):
        raise ValueError("lengths and depths must each hold at least one value")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, Real) or not 0 <= depth <= 1:
            raise ValueError(f"depths must be numbers in [0, 1], got {depth!r}")
    if isinstance(trials, bool) or not isinstance(trials, Integral) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    return parsed, [float(depth) for depth in depths], int(trials)


def _cell_seed(seed: int, length: int, depth_index: int) -> int:
    return int(np.random.SeedSequence([seed, length, depth_index]).generate_state(1)[0])


def retrieval_accuracy(
    model: nn.Module,
    task: str = "passkey",
    lengths: Sequence[int | str] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    filler: str | None = None,
    rows_per_pass: int | None = None,
    chunk_size: int | str | None = "auto",
    n_boot: int = 200,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """Passkey ("passkey") or key-value ("kv") retrieval accuracy of ``model``.

    One cell per (length, depth): ``trials`` prompts of exactly ``length`` tokens with the
    needle at ``depth`` in [0, 1] (0: first). ``tokenizer``: None (bytes), a local Hugging
    Face tokenizer directory, or a tokenizer object. ``progress(done, total)`` is called after
    each cell. ``filler`` (passkey only; None: the default, "standard"): "standard" (the
    repeated "grass is green" sentence) or "text" (held-out natural text), see
    :func:`fidelity.probes.tasks.passkey_probe`; giving one for kv raises ``InputError``.
    ``rows_per_pass``: prompts read in one forward (None: all ``trials`` of a cell at once);
    fewer bound the memory of long prompts without changing any prediction.
    ``chunk_size``: "auto" (the model's own chunk length, see
    :meth:`fidelity.models.base.CausalLM.auto_chunk_size`), None (one call) or an int, for our
    models' prefill. Returns rows with columns :data:`FRAME_COLUMNS`: metrics
    ``{task}_acc`` and ``{task}_digit_acc`` (see the module docstring), ``layer ==
    source_layer == -1``, ``n = trials``.
    """
    lengths, depths, trials = _check_options(task, lengths, depths, trials)
    if rows_per_pass is not None and (
        isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int) or rows_per_pass < 1
    ):
        raise InputError(f"rows_per_pass must be a positive integer or None, got {rows_per_pass!r}")
    probe_options = _check_filler(task, filler)
    chunk_size = resolve_chunk_size(model, chunk_size, ignore_without_cache=True)
    tokenizer = as_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    rows, total, done = [], len(lengths) * len(depths), 0
    try:
        for length in lengths:
            for index, depth in enumerate(depths):
                probe = make_probe(
                    task,
                    length,
                    batch=trials,
                    seed=_cell_seed(seed, length, index),
                    tokenizer=tokenizer,
                    depth=depth,
                    **probe_options,
                )
                rows.extend(
                    _score_cell(
                        model, probe, tokenizer, chunk_size, rows_per_pass, seed, n_boot, level
                    )
                )
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    return tidy_frame(rows, columns=FRAME_COLUMNS)


def _score_cell(
    model, probe: ProbeInput, tokenizer, chunk_size, rows_per_pass, seed, n_boot, level
) -> list:
    """The two rows of one (length, depth) cell, its prompts read ``rows_per_pass`` at a time."""
    answers, real = _padded_answers(probe)
    step = rows_per_pass or probe.input_ids.shape[0]
    predicted = torch.cat(
        [
            teacher_forced_predictions(model, prompts, expected, chunk_size).cpu()
            for prompts, expected in zip(
                probe.input_ids.split(step), answers.split(step), strict=True
            )
        ]
    )
    correct = (predicted == answers) | ~real  # (trials, n)
    exact = correct.all(dim=1)
    digits = _digit_mask(answers, real, tokenizer)
    digit_acc = ((predicted == answers) & digits).sum(1) / digits.sum(1)  # (trials,)
    trials, length = probe.input_ids.shape
    depth = float(probe.depths[0])
    distance = round(float(np.mean([length - end for _, end in probe.needle_spans])))
    hits = int(exact.sum())
    low, high = wilson_interval(hits, trials, level)
    counts = (
        bootstrap_counts(trials, n_boot, [seed, length, round(depth * 1000)]) if n_boot else None
    )
    digit = mean_with_interval(digit_acc.double().numpy(), counts, level)
    common = (-1, distance)
    return [
        (f"{probe.task}_acc", *common, hits / trials, low, high, trials, -1, length, depth),
        (f"{probe.task}_digit_acc", *common, *digit, trials, -1, length, depth),
    ]
