"""Perplexity on held-out text windows, by window length.

For each length ``L``, ``n_sequences`` windows of ``L`` tokens are drawn from the held-out
split of the text corpus (:func:`fidelity.probes.tasks.text_probe`; the default corpus is the
Python standard library's sources). Every position but the last predicts the next token; the
per-token cross-entropy (natural log, float64) is summed over the whole window, so a window
scores ``L - 1`` predictions made with everything before them in context. Long windows run
chunk by chunk through our models' recurrent cache (the last logits of a chunk predict the
next chunk's first token), which gives the one-pass numbers (tested).

Rows (``layer == source_layer == -1``, ``distance`` 0, ``length`` the window length):
``perplexity`` = ``exp(mean NLL per token)`` and, with the byte tokenizer, ``bits_per_byte`` =
``mean NLL / ln 2``; intervals are percentile bootstraps over the windows, ``n`` the number
of windows. Models that return logits at only some positions (DeciMamba once decimation
drops rows) are refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fidelity.lengths import parse_length
from fidelity.metrics.curves import DEFAULT_LEVEL, bootstrap_counts, percentile_interval
from fidelity.metrics.toolkit import resolve_chunk_size, tidy_frame
from fidelity.models.base import CausalLM
from fidelity.probes.tasks import make_probe
from fidelity.probes.tokenizer import ByteTokenizer, Tokenizer, as_tokenizer
from fidelity.schema import TIDY_COLUMNS

FRAME_COLUMNS = (*TIDY_COLUMNS, "length", "depth")
"""Columns of the frame: the tidy columns, the window length and ``depth`` (NaN)."""
_LOSS_SLICE = 1024  # positions whose float64 cross-entropy is computed at a time


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _checked_logits(model: nn.Module, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits `(batch, n, vocab)` of ``ids`` `(batch, n)`, one per position or an error."""
    output = model(ids) if cache is None else model(ids, cache=cache)
    logits = _logits(output)
    if logits.shape[1] != ids.shape[1]:
        raise ValueError(
            f"perplexity needs logits at every position; {type(model).__name__} returned "
            f"{logits.shape[1]} for {ids.shape[1]} tokens (DeciMamba drops decimated positions: "
            "use decimation=False or lengths within its budget)"
        )
    return logits


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy per row `(batch,)` float64 of ``logits`` `(batch, n, vocab)`
    against ``targets`` `(batch, n)`."""
    total = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[1], _LOSS_SLICE):
        piece = logits[:, start : start + _LOSS_SLICE].double()  # (batch, slice, vocab)
        losses = F.cross_entropy(
            piece.transpose(1, 2), targets[:, start : start + _LOSS_SLICE], reduction="none"
        )  # (batch, slice)
        total += losses.sum(dim=1)
    return total


@torch.no_grad()
def sequence_nll(model: nn.Module, input_ids: torch.Tensor, chunk_size: int | None = None):
    """Summed next-token negative log-likelihood of each row of ``input_ids`` `(batch, L)`:
    `(batch,)` float64 over the ``L - 1`` predictions. ``chunk_size`` (our models only) feeds
    the rows in chunks through the recurrent cache."""
    parameter = next(model.parameters(), None)
    ids = input_ids.to(parameter.device if parameter is not None else "cpu")
    if chunk_size is None or ids.shape[1] <= chunk_size:
        logits = _checked_logits(model, ids)
        return _summed_nll(logits[:, :-1], ids[:, 1:]).cpu()
    if not isinstance(model, CausalLM):
        raise ValueError("chunk_size needs one of our models (a recurrent cache); use None")
    cache = model.init_cache(ids.shape[0])
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    previous_last = None  # (batch, 1, vocab): logits of the position before this chunk
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        logits = _checked_logits(model, chunk, cache)
        if previous_last is not None:
            logits = torch.cat([previous_last, logits], dim=1)
            chunk = ids[:, start - 1 : start + chunk_size]
        total += _summed_nll(logits[:, :-1], chunk[:, 1:])
        previous_last = logits[:, -1:]
    return total.cpu()


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def perplexity(
    model: nn.Module,
    lengths: Sequence[int | str] | int | str,
    *,
    n_sequences: int = 4,
    seed: int = 0,
    split: str = "heldout",
    text: str | Path | Sequence[str | Path] | None = None,
    chunk_size: int | str | None = "auto",
    tokenizer: Tokenizer | str | Path | None = None,
    n_boot: int = 200,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """Perplexity of ``model`` on ``n_sequences`` text windows per length in ``lengths``.

    ``text``: files or directories (as ``text_probe``'s ``paths``), None for the default
    corpus; ``split``: "heldout", "train" or "all"; ``tokenizer``: None (bytes), a local Hugging
    Face tokenizer directory or a tokenizer object; ``chunk_size``: "auto" (the model's own
    chunk length, see :meth:`fidelity.models.base.CausalLM.auto_chunk_size`), None (one pass) or
    an int. Windows come from
    ``make_probe("text", length, batch=n_sequences, seed=seed, ...)``. Returns rows with
    columns :data:`FRAME_COLUMNS` (see the module docstring).
    """
    if isinstance(lengths, (str, int)):
        lengths = [lengths]
    parsed = [parse_length(length) for length in lengths]
    if not parsed or min(parsed) < 2:
        raise ValueError(f"lengths must hold at least one length >= 2 tokens, got {lengths!r}")
    n_sequences = _check_count("n_sequences", n_sequences)
    chunk = resolve_chunk_size(model, chunk_size)
    tokenizer = as_tokenizer(tokenizer)
    is_bytes = isinstance(tokenizer, ByteTokenizer)
    options = {"split": split} if text is None else {"split": split, "paths": text}
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length in parsed:
            probe = make_probe(
                "text", length, batch=n_sequences, seed=seed, tokenizer=tokenizer, **options
            )
            per_token = sequence_nll(model, probe.input_ids, chunk).numpy() / (length - 1)
            rows.extend(_rows(per_token, length, is_bytes, seed, n_boot, level))
    finally:
        model.train(was_training)
    return tidy_frame(rows, columns=FRAME_COLUMNS)


def _rows(per_token: np.ndarray, length: int, is_bytes: bool, seed, n_boot, level) -> list:
    """``perplexity`` (and ``bits_per_byte``) rows from per-window mean NLL `(n_windows,)`."""
    mean = float(per_token.mean())
    if n_boot:
        counts = bootstrap_counts(per_token.size, n_boot, [seed, length])
        low, high = percentile_interval(per_token @ counts / per_token.size, level)
    else:
        low = high = math.nan
    n = per_token.size
    rows = [("perplexity", -1, 0, math.exp(mean), math.exp(low), math.exp(high), n, -1)]
    if is_bytes:
        bits = 1 / math.log(2)
        rows.append(("bits_per_byte", -1, 0, mean * bits, low * bits, high * bits, n, -1))
    return [(*row, length, math.nan) for row in rows]
