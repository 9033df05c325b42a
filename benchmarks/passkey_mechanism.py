"""Why passkey retrieval works or fails: needle occlusion, MemMamba's pool trace, ETMF (issue 16,
item 3).

For each model (a shipped name or a checkpoint directory, ``--model label=path`` repeated) and
length, ``--trials`` passkey prompts at each of 5 needle depths
(:func:`fidelity.probes.tasks.passkey_probe`, standard filler or ``--filler text``) give one
row each:

- right or wrong: exact match of the 5 digits by teacher forcing
  (:func:`fidelity.metrics.retrieval.teacher_forced_predictions`, as scripts/passkey_eval.py);
- needle effect: the log-probability (nats, summed over the answer's digit tokens, teacher
  forced) of the right answer minus the same with the needle's key replaced by another key
  (same length, every digit different, seeded): a causal occlusion of the needle. Control
  effect: the same for a filler span right next to the needle (the key's token positions
  shifted by one needle length plus its newline, so the same size at the same distance class),
  its tokens replaced by other tokens of the row's filler. "The answer reads the needle" when
  the needle effect exceeds the control (paired t interval above 0);
- MemMamba, per block (0-based): ``written``: a note whose window (the ``note_window``
  positions it pools) holds a key digit of the needle; ``kept``: such a note is in the block's
  pool at the first answer position (the position whose logits give the first answer digit;
  the pool rebuilt with :meth:`MemMambaTrace.pool_at`); ``fired``: the fraction of answer
  positions (those whose logits give the answer digits) where cross-token attention fired;
  ``token weight`` / ``layer weight``: the attention weight (mean over heads and answer
  positions) on the needle's notes, cross-token and cross-layer (the latter over the notes of
  the blocks it reads);
- DeciMamba, per decimating layer (0-based): ``needle``: the share of the needle's key
  positions the layer kept; ``question``: the share of the question's positions (its line at
  the end of the prompt) it kept; ``kept``: the share of the prompt's positions it kept (the
  prefill of the right answer's teacher-forced pass, chunked as scored);
- ETMF at the needle distance: per layer, ``etmf_norm`` from ``fidelity.analyze(model, length,
  probe="text", metrics="etmf")`` at the probed distance nearest the row's distance from the
  needle's last key digit to the first answer position.

Aggregated per model, length and depth, split by right / wrong rows: Wilson 95% intervals for
rates, t intervals for means. Writes ``benchmarks/results/passkey_mechanism.md`` (with one
"which mechanism carried the key, or where it was lost" line per model and length) and the
rows to ``runs/passkey-mechanism/raw.json``.

    nice -n 10 python benchmarks/passkey_mechanism.py --model memmamba=runs/pk-memmamba \\
        --model mamba=runs/pk-mamba --lengths 1k,4k,16k
    python benchmarks/passkey_mechanism.py --model memmamba --lengths 1k --trials 2  # a look
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import t as student_t

import fidelity
from fidelity.atomic import write_text_atomically
from fidelity.budget import check_fits, estimate_run, estimate_seconds, forward_cost
from fidelity.errors import InputError
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.retrieval import (
    DEFAULT_DEPTHS,
    teacher_forced_logits,
    wilson_interval,
)
from fidelity.metrics.toolkit import resolve_chunk_size
from fidelity.models.loading import load_model
from fidelity.models.memmamba import MemMambaLM
from fidelity.probes.memmamba_trace import MemMambaTrace, tracing_memmamba
from fidelity.probes.tasks import (
    FILLERS,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    ProbeInput,
    passkey_probe,
)
from fidelity.probes.tokenizer import Tokenizer, as_tokenizer
from fidelity.train import checkpoint_dirs

ROOT = Path(__file__).resolve().parent.parent
LEVEL = 0.95
READ_SHARE = 0.5  # "attended": the needle's notes got at least this share of the weight
DEFAULT_OUT = ROOT / "benchmarks/results/passkey_mechanism.md"


@dataclass
class Occlusion:
    """One row's perturbations: ``key`` and ``control`` are the token positions `(k,)` the
    needle occlusion and the filler control change, ``key_ids`` / ``control_ids`` their new
    tokens (``control`` empty where no filler span fits next to the needle)."""

    key: torch.Tensor
    key_ids: torch.Tensor
    control: torch.Tensor
    control_ids: torch.Tensor


def other_key(key: str, rng: np.random.Generator) -> str:
    """A key of the same length whose every digit differs from ``key``'s (first digit not 0)."""
    digits = []
    for index, digit in enumerate(key):
        choices = [d for d in "0123456789" if d != digit and (index or d != "0")]
        digits.append(choices[int(rng.integers(0, len(choices)))])
    return "".join(digits)


def occlusion(
    probe: ProbeInput, row: int, tokenizer: Tokenizer, rng: np.random.Generator
) -> Occlusion:
    """The needle occlusion and its filler control for ``row`` of a passkey ``probe``.

    Key positions: where the needle re-encoded with another key (:func:`other_key`) differs
    from the needle (with bytes: the 10 digits of the two copies of the key). Control: the
    same positions shifted back by the needle's length plus one (the newline), into the
    filler before the needle, or forward into the filler after it when the former does not
    fit; each token replaced by a different token drawn from the row's filler."""
    start, end = probe.needle_spans[row]
    ids = probe.input_ids[row]
    for _ in range(20):  # with bytes the first draw always fits
        new = tokenizer.encode(PASSKEY_NEEDLE.format(key=other_key(probe.answers[row], rng)))
        if len(new) == end - start:
            break
    else:
        raise InputError(
            f"tokenizer {tokenizer.name!r} encodes the needle with another key to a different "
            "length, so the needle cannot be occluded in place"
        )
    new = torch.as_tensor(new, dtype=torch.long)
    changed = (new != ids[start:end]).nonzero()[:, 0]
    key = changed + start
    head = len(tokenizer.encode(PASSKEY_INTRO + "\n"))
    tail = probe.length - len(tokenizer.encode("\n" + PASSKEY_QUESTION))
    filler = torch.cat([ids[head : start - 1], ids[end + 1 : tail]])
    shift = end - start + 1
    control = torch.empty(0, dtype=torch.long)
    if len(key) and int(key.min()) - shift >= head:
        control = key - shift
    elif len(key) and int(key.max()) + shift < tail:
        control = key + shift
    control_ids = torch.empty(0, dtype=torch.long)
    if len(control):
        replacements = []
        for position in control.tolist():
            choices = filler[filler != ids[position]].unique()
            replacements.append(int(choices[int(rng.integers(0, len(choices)))]))
        control_ids = torch.tensor(replacements, dtype=torch.long)
    return Occlusion(key, new[changed], control, control_ids)


def digit_mask(answers: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Which answer tokens hold a digit: `(batch, n)` bool."""
    return torch.tensor(
        [[any(c.isdigit() for c in tokenizer.decode([t])) for t in row] for row in answers.tolist()]
    )


def answer_log_probs(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    answers: torch.Tensor,
    digits: torch.Tensor,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forced: (log-probability of the answer's digit tokens `(batch,)` in nats, the
    argmax predictions `(batch, n)`)."""
    logits = teacher_forced_logits(model, prompt, answers, chunk_size).float().cpu()
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, answers[..., None])[..., 0]
    return (log_probs * digits).sum(dim=1), logits.argmax(-1)


def needle_notes(positions: torch.Tensor, key: torch.Tensor, window: int) -> torch.Tensor:
    """Which notes `(n,)` (by the position that wrote them) pool a key position: a note at
    ``p`` pools ``p - window + 1 .. p``."""
    if not len(key):
        return torch.zeros_like(positions, dtype=torch.bool)
    offset = positions[:, None] - key[None, :]
    return ((offset >= 0) & (offset < window)).any(dim=1)


@torch.no_grad()
def pool_trace(
    model: MemMambaLM,
    prompt: torch.Tensor,
    answers: torch.Tensor,
    digits: torch.Tensor,
    keys: Sequence[torch.Tensor],
    chunk_size: int | None,
) -> list[dict]:
    """MemMamba's memory of the needle, per row: ``{block: {written, kept, fired,
    token_weight, layer_weight}}`` (see the module docstring; weights None where the block
    has no such attention). One traced forward over ``prompt + answers[:, :-1]``."""
    length = prompt.shape[1]
    sequence = torch.cat([prompt, answers[:, :-1]], dim=1)
    batch = sequence.shape[0]
    answer_positions = [
        [length - 1 + k for k in range(answers.shape[1]) if digits[row, k]] for row in range(batch)
    ]
    wanted = sorted({p for positions in answer_positions for p in positions})
    step = chunk_size or sequence.shape[1]
    with tracing_memmamba(model, tuple(sequence.shape), wanted) as trace:
        cache = model.init_cache(batch)
        for start in range(0, sequence.shape[1], step):
            model(sequence[:, start : start + step], cache=cache)
    return [
        block_flags(trace, row, keys[row], answer_positions[row], model.config.note_window)
        for row in range(batch)
    ]


def block_flags(
    trace: MemMambaTrace, row: int, key: torch.Tensor, answer_positions: list[int], window: int
) -> dict[int, dict]:
    """Per block, the flags of one row (see :func:`pool_trace`)."""
    flags = {}
    for block in sorted(trace.logs):
        rows, positions, _ = trace.writes(block)
        mine = positions[rows == row]
        pool = trace.pool_at(block, answer_positions[0], row)
        weights = {"token": [], "layer": []}
        fired = []
        for record in trace.attention:
            if (
                record.block != block
                or record.row != row
                or record.query_position not in answer_positions
            ):
                continue
            share = record.weights[:, needle_notes(record.note_positions, key, window)].sum(-1)
            weights[record.kind].append(float(share.mean()))
            if record.kind == "token":
                fired.append(record.fired)
        flags[block] = {
            "written": bool(needle_notes(mine, key, window).any()),
            "kept": bool(needle_notes(pool, key, window).any()),
            "fired": float(np.mean(fired)) if fired else None,
            "token_weight": float(np.mean(weights["token"])) if weights["token"] else None,
            "layer_weight": float(np.mean(weights["layer"])) if weights["layer"] else None,
        }
    return flags


@contextmanager
def recording_decimation(model: torch.nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """While open, the positions `(batch, n_kept)` each decimating layer of ``model`` keeps in
    each forward call (a chunk), by layer index: ``{layer: [positions, ...]}``; empty for a
    model without decimating layers. Hooks removed on exit."""
    kept: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(getattr(model, "layers", [])):
        decimation = getattr(block, "decimation", None)
        if decimation is None:
            continue

        def record(module, inputs, output, index=index) -> None:
            kept.setdefault(index, []).append(output.positions.detach().cpu())

        handles.append(decimation.register_forward_hook(record))
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def decimation_flags(
    kept: dict[int, list[torch.Tensor]],
    row: int,
    key: torch.Tensor,
    question: torch.Tensor,
    length: int,
) -> dict[int, dict]:
    """Per decimating layer, what one row's prefill kept of the needle's ``key`` positions,
    of the ``question`` positions and of the ``length`` prompt positions (shares in [0, 1])."""
    flags = {}
    for layer, calls in sorted(kept.items()):
        positions = torch.cat([call[row] for call in calls])
        positions = positions[positions < length]
        flags[layer] = {
            "needle": float(torch.isin(key, positions).float().mean()) if len(key) else None,
            "question": float(torch.isin(question, positions).float().mean()),
            "kept": len(positions) / length,
        }
    return flags


def etmf_at(frame, distance: int) -> dict[int, float]:
    """Per layer (1..), ``etmf_norm`` at the probed distance nearest ``distance``."""
    values = {}
    held = frame[frame["metric"] == "etmf_norm"]
    for layer, rows in held.groupby("layer"):
        if int(layer) == 0:
            continue
        nearest = rows.iloc[(rows["distance"] - distance).abs().argsort().iloc[0]]
        values[int(layer)] = (int(nearest["distance"]), float(nearest["value"]))
    return values


@dataclass
class CellOptions:
    """What every cell of a run shares."""

    trials: int = 10
    filler: str = "standard"
    seed: int = 0
    chunk_size: int | str | None = "auto"
    depths: Sequence[float] = DEFAULT_DEPTHS
    tokenizer: Tokenizer | None = None


@dataclass
class Row:
    """One prompt's measurements (see the module docstring)."""

    model: str
    length: int
    depth: float
    right: bool
    distance: int
    log_prob: float
    needle_effect: float
    control_effect: float | None
    etmf: dict = field(default_factory=dict)
    pool: dict | None = None
    decimation: dict | None = None


def measure_cell(
    model: torch.nn.Module,
    label: str,
    length: int,
    depth_index: int,
    options: CellOptions,
    etmf_frame=None,
) -> list[Row]:
    """The rows of one (model, length, depth) cell: ``options.trials`` prompts."""
    tokenizer = options.tokenizer or as_tokenizer(None)
    depth = options.depths[depth_index]
    probe = passkey_probe(
        length,
        batch=options.trials,
        seed=options.seed * 1000 + depth_index,
        depth=depth,
        filler=options.filler,
        tokenizer=tokenizer,
    )
    rng = np.random.default_rng([options.seed, length, depth_index])
    answers = torch.tensor(probe.answer_ids)
    digits = digit_mask(answers, tokenizer)
    chunk = resolve_chunk_size(model, options.chunk_size, ignore_without_cache=True)
    occlusions = [occlusion(probe, row, tokenizer, rng) for row in range(probe.batch)]
    prompt = probe.input_ids
    occluded, controlled = prompt.clone(), prompt.clone()
    for row, item in enumerate(occlusions):
        occluded[row, item.key] = item.key_ids
        controlled[row, item.control] = item.control_ids
    with recording_decimation(model) as kept:
        base, predicted = answer_log_probs(model, prompt, answers, digits, chunk)
    right = (predicted == answers).all(dim=1)
    without_needle, _ = answer_log_probs(model, occluded, answers, digits, chunk)
    without_filler, _ = answer_log_probs(model, controlled, answers, digits, chunk)
    pools = None
    if isinstance(model, MemMambaLM):
        keys = [item.key for item in occlusions]
        pools = pool_trace(model, prompt, answers, digits, keys, chunk)
    decimation = None
    if kept:
        question = torch.arange(
            length - len(tokenizer.encode("\n" + PASSKEY_QUESTION)), length, dtype=torch.long
        )
        decimation = [
            decimation_flags(kept, row, item.key, question, length)
            for row, item in enumerate(occlusions)
        ]
    first_answer = length - 1 + int(digits[0].nonzero()[0, 0])
    rows = []
    for row, item in enumerate(occlusions):
        distance = first_answer - int(item.key.max())
        rows.append(
            Row(
                model=label,
                length=length,
                depth=float(depth),
                right=bool(right[row]),
                distance=distance,
                log_prob=float(base[row]),
                needle_effect=float(base[row] - without_needle[row]),
                control_effect=float(base[row] - without_filler[row])
                if len(item.control)
                else None,
                etmf=etmf_at(etmf_frame, distance) if etmf_frame is not None else {},
                pool=pools[row] if pools is not None else None,
                decimation=decimation[row] if decimation is not None else None,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------
# aggregation and the table


def mean_interval(
    values: Sequence[float], bounds: tuple[float, float] | None = None
) -> tuple[float, float, float] | None:
    """(mean, low, high): a t interval at ``LEVEL`` (clipped to ``bounds`` for bounded
    quantities); None for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.5 + LEVEL / 2, len(values) - 1)) * float(
        np.std(values, ddof=1) / math.sqrt(len(values))
    )
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return mean, low, high


def rate(flags: Sequence[bool]) -> str:
    """``k/n (p% [low, high])`` with a Wilson interval; ``-`` for none."""
    if not flags:
        return "-"
    k, n = sum(flags), len(flags)
    low, high = wilson_interval(k, n, LEVEL)
    return f"{k}/{n} [{100 * low:.0f}, {100 * high:.0f}]%"


def fmt_mean(stats: tuple[float, float, float] | None, spec: str = ".3g") -> str:
    if stats is None:
        return "-"
    mean, low, high = stats
    if math.isnan(low):
        return format(mean, spec)
    return f"{format(mean, spec)} [{format(low, spec)}, {format(high, spec)}]"


def groups(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by ``keys``, in first-seen order."""
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row)
    return grouped


def cells_by_outcome(rows: Sequence[dict]) -> Iterator[tuple[str, int, float, str, list[dict]]]:
    """(model, length, depth, outcome, rows) for each cell's right rows, then its wrong rows
    (outcomes without rows left out), in first-seen order."""
    for (label, length, depth), cell in groups(rows, ["model", "length", "depth"]).items():
        for outcome in ("right", "wrong"):
            part = [r for r in cell if r["right"] == (outcome == "right")]
            if part:
                yield label, length, depth, outcome, part


def blocks_of(rows: Sequence[dict]) -> list[str]:
    return sorted({b for r in rows if r["pool"] for b in r["pool"]}, key=int)


def _pool_values(rows: Sequence[dict], block: str, key: str) -> list:
    return [r["pool"][block][key] for r in rows if r["pool"][block][key] is not None]


def _share(rows: Sequence[dict], block: str, key: str) -> str:
    """The mean of a fraction over ``rows`` with its t interval, clipped to [0, 1]."""
    return fmt_mean(mean_interval(_pool_values(rows, block, key), (0.0, 1.0)), ".2f")


def verdict(rows: Sequence[dict]) -> str:
    """Which mechanism carried the key in ``rows`` (one model and length), or where it was
    lost, in plain words, from the rules stated in the table's notes; for DeciMamba, what its
    decimating layers kept."""
    return _mechanism(rows) + _decimation_summary(rows)


def _mechanism(rows: Sequence[dict]) -> str:
    right = [r for r in rows if r["right"]]
    paired = [
        r["needle_effect"] - r["control_effect"] for r in rows if r["control_effect"] is not None
    ]
    diff = mean_interval(paired)
    needle = mean_interval([r["needle_effect"] for r in rows])
    reads = diff is not None and not math.isnan(diff[1]) and diff[1] > 0
    effect = (
        f"needle effect {fmt_mean(needle)} nats, needle minus control {fmt_mean(diff)}"
        if diff
        else f"needle effect {fmt_mean(needle)} nats"
    )
    accuracy = f"{len(right)}/{len(rows)} right"
    pooled = rows[0]["pool"] is not None
    etmf = _etmf_summary(rows)
    if right:
        subject = right
        if pooled:
            reading = _pool_reading(subject)
            if reading:
                return f"{accuracy}: carried by the pool ({reading}); {effect}"
            stage = _pool_stage(subject)
            if reads:
                return (
                    f"{accuracy}: carried by the recurrent state, not the pool ({stage}); "
                    f"{effect}{etmf}"
                )
            return (
                f"{accuracy}: no mechanism measured ({stage}; the answer does not read the "
                f"needle beyond the control); {effect}{etmf}"
            )
        if reads:
            return (
                f"{accuracy}: carried by the sequence mixer (the recurrent state, in Mamba "
                f"models); {effect}{etmf}"
            )
        return f"{accuracy}: right without reading the needle beyond the control; {effect}{etmf}"
    where = "lost"
    if pooled:
        where += f" ({_pool_stage(rows)})"
    state = (
        "the needle still moves the answer beyond the control, too little to retrieve it"
        if reads
        else "the answer does not read the needle beyond the control"
    )
    return f"{accuracy}: {where}; {state}; {effect}{etmf}"


def _any_block(rows: Sequence[dict], key: str) -> list[bool]:
    return [any(flags[key] for flags in r["pool"].values()) for r in rows]


def _pool_stage(rows: Sequence[dict]) -> str:
    """Where the pool lost the key: the first of write, keep, read that most rows fail."""
    n = len(rows)
    written = sum(_any_block(rows, "written"))
    kept = sum(_any_block(rows, "kept"))
    if 2 * written < n:
        return f"pool: no block wrote a note over the key in {n - written}/{n} rows"
    if 2 * kept < n:
        return (
            f"pool: written in {written}/{n} rows but evicted before the answer in {n - kept}/{n}"
        )
    read = sum(bool(_pool_reading([r])) for r in rows)
    return (
        f"pool: kept in {kept}/{n} rows but the answer positions did not attend the needle's "
        f"notes (share >= {READ_SHARE} where fired) in {n - read}/{n}"
    )


def _pool_reading(rows: Sequence[dict]) -> str:
    """Non-empty when in most ``rows`` some block kept a needle note and cross-token attention
    fired on it with at least ``READ_SHARE`` of its weight, or cross-layer attention gave the
    needle's notes that share: names the blocks and the mean weight."""
    hits: dict[str, list[float]] = {}
    reading_rows = 0
    for r in rows:
        found = False
        for block, flags in r["pool"].items():
            token = (
                flags["kept"]
                and (flags["fired"] or 0) > 0
                and (flags["token_weight"] or 0) >= READ_SHARE
            )
            layer = (flags["layer_weight"] or 0) >= READ_SHARE
            if token or layer:
                kind = "cross-token" if token else "cross-layer"
                weight = flags["token_weight"] if token else flags["layer_weight"]
                hits.setdefault(f"block {block} {kind}", []).append(weight)
                found = True
        reading_rows += found
    if 2 * reading_rows <= len(rows):
        return ""
    named = ", ".join(
        f"{name} weight {np.mean(w):.2f} in {len(w)} rows" for name, w in hits.items()
    )
    return f"read in {reading_rows}/{len(rows)} rows: {named}"


def layers_of(rows: Sequence[dict]) -> list:
    """The decimating layers of ``rows`` (keys as stored: int, or str after JSON)."""
    return sorted({k for r in rows if r.get("decimation") for k in r["decimation"]}, key=int)


def _decimation_summary(rows: Sequence[dict]) -> str:
    """``; decimation: layer L kept ...`` for rows with a decimation record, else empty."""
    if not rows[0].get("decimation"):
        return ""
    n = len(rows)
    parts = []
    for layer in layers_of(rows):
        flags = [r["decimation"][layer] for r in rows]
        needle = [f["needle"] for f in flags if f["needle"] is not None]
        parts.append(
            f"layer {layer} kept {100 * np.mean([f['kept'] for f in flags]):.1f}% of the "
            f"prompt, {np.mean(needle):.2f} of the needle's key positions (all of them in "
            f"{sum(v == 1.0 for v in needle)}/{n} rows) and "
            f"{np.mean([f['question'] for f in flags]):.2f} of the question's (all in "
            f"{sum(f['question'] == 1.0 for f in flags)}/{n})"
        )
    return "; decimation: " + "; ".join(parts)


def _etmf_summary(rows: Sequence[dict]) -> str:
    if not rows[0]["etmf"]:
        return ""
    last = max(rows[0]["etmf"], key=int)
    values = [r["etmf"][last][1] for r in rows]
    distances = [r["etmf"][last][0] for r in rows]
    return (
        f"; last layer's ETMF at the probed distances nearest the needle's "
        f"({min(distances)}-{max(distances)}): "
        f"{np.mean(values):.2f}"
    )


def write_table(out: Path, records: dict) -> None:
    """The markdown file of a run (``records``: what :func:`main` saves to the raw file)."""
    rows = records["rows"]
    lines = [
        "# Passkey mechanism: which mechanism carried the key, or where it was lost",
        "",
    ]
    if records.get("label"):
        lines += [f"**{records['label']}**", ""]
    lines += [
        f"Command: `{records['command']}` ({records['date']}; {records['seconds'] / 60:.1f} min, "
        f"load average {records['load']}; shared 2-core CPU, niced). Filler: "
        f"{records['filler']}; {records['trials']} prompts per depth, depths "
        f"{', '.join(str(d) for d in records['depths'])}. Module docstring of "
        "`benchmarks/passkey_mechanism.py`: the definitions.",
        "",
        "## Verdicts",
        "",
    ]
    for (label, length), cell in groups(rows, ["model", "length"]).items():
        lines.append(f"- **{label} at {format_length(length)}**: {verdict(cell)}")
    lines += [
        "",
        'Rules: "carried by the pool" when in most right rows some block kept a note over '
        f"the key and cross-token attention fired at the answer with at least {READ_SHARE} of "
        "its weight on the needle's notes (or cross-layer attention gave them that share); "
        '"carried by the recurrent state" (MemMamba) or "by the sequence mixer" (other models) '
        "when the answer reads the needle (needle effect minus control effect, paired t 95% "
        "interval above 0) and the pool did not carry it; "
        '"lost" when no row is right, with the first pool stage (write, keep, read) that most '
        "rows fail.",
        "",
        "## Rows by depth",
        "",
        "Effects in nats of the answer digits' log-probability (t 95% interval); `d`: distance "
        "from the needle's last key digit to the first answer position; ETMF: `etmf_norm` per "
        "layer at the probed distance nearest `d`.",
        "",
        "| model | length | depth | outcome | rows | d | log p(answer) | needle effect "
        "| control effect | ETMF by layer @d |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, length, depth, outcome, part in cells_by_outcome(rows):
        etmf = "-"
        if part[0]["etmf"]:
            layers = sorted(part[0]["etmf"], key=int)
            etmf = (
                " ".join(f"{np.mean([r['etmf'][layer][1] for r in part]):.2f}" for layer in layers)
                + f" (@{part[0]['etmf'][layers[-1]][0]})"
            )
        lines.append(
            f"| {label} | {format_length(length)} | {depth:g} | {outcome} | {len(part)} | "
            f"{np.median([r['distance'] for r in part]):.0f} | "
            f"{fmt_mean(mean_interval([r['log_prob'] for r in part]))} | "
            f"{fmt_mean(mean_interval([r['needle_effect'] for r in part]))} | "
            f"{fmt_mean(mean_interval([r['control_effect'] for r in part]))} | {etmf} |"
        )
    pooled = [r for r in rows if r["pool"]]
    if pooled:
        lines += [
            "",
            "## MemMamba's pool, per block",
            "",
            "Rates over rows with Wilson 95% intervals: `written` (a note pools a key digit), "
            "`kept` (such a note is in the pool at the first answer position); `fired`: mean "
            "fraction of answer positions where cross-token attention fired; weights: mean "
            "attention share of the needle's notes at the answer positions (t 95% interval).",
            "",
            "| model | length | depth | outcome | block | written | kept | fired | token weight "
            "| layer weight |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, length, depth, outcome, part in cells_by_outcome(pooled):
            for block in blocks_of(part):
                lines.append(
                    f"| {label} | {format_length(length)} | {depth:g} | {outcome} | {block} | "
                    f"{rate([r['pool'][block]['written'] for r in part])} | "
                    f"{rate([r['pool'][block]['kept'] for r in part])} | "
                    f"{_share(part, block, 'fired')} | "
                    f"{_share(part, block, 'token_weight')} | "
                    f"{_share(part, block, 'layer_weight')} |"
                )
    decimated = [r for r in rows if r.get("decimation")]
    if decimated:
        lines += [
            "",
            "## DeciMamba's decimation, per decimating layer",
            "",
            "In the prefill of the right answer's teacher-forced pass: `prompt kept`, "
            "`needle kept`, `question kept`: the mean share of the prompt's positions, of the "
            "needle's key positions and of the question line's positions the layer kept (t 95% "
            "interval); `needle whole` / `question whole`: rows where it kept all of them "
            "(Wilson 95% interval).",
            "",
            "| model | length | depth | outcome | layer | prompt kept | needle kept | needle whole "
            "| question kept | question whole |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, length, depth, outcome, part in cells_by_outcome(decimated):
            for layer in layers_of(part):
                flags = [r["decimation"][layer] for r in part]
                shares = {
                    name: fmt_mean(mean_interval([f[name] for f in flags], (0.0, 1.0)), ".3f")
                    for name in ("kept", "needle", "question")
                }
                lines.append(
                    f"| {label} | {format_length(length)} | {depth:g} | {outcome} | {layer} "
                    f"| {shares['kept']} | {shares['needle']} | "
                    f"{rate([f['needle'] == 1.0 for f in flags])} | {shares['question']} | "
                    f"{rate([f['question'] == 1.0 for f in flags])} |"
                )
    write_text_atomically(out, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# the run


def _shown(path: Path) -> str:
    """``path`` as a command line shows it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def parse_models(values: Sequence[str]) -> dict[str, str]:
    """``label=path`` (or a bare shipped name / directory, its own label) -> {label: source};
    a training run directory becomes its newest checkpoint."""
    models = {}
    for value in values:
        label, _, source = value.partition("=")
        source = source or label
        if not label or label in models:
            raise InputError(f"--model needs distinct labels (label=path), got {value!r}")
        found = checkpoint_dirs(Path(source)) if Path(source).is_dir() else []
        models[label] = str(found[-1]) if found else source
    return models


def plan(models: dict, lengths: list[int], options: CellOptions, anchors: int) -> float:
    """Print the plan (cells, forwards, estimated time and memory) and return the estimated
    seconds; raises when a forward would not fit in memory."""
    total = 0.0
    print(
        f"plan: {len(models)} model(s) x {len(lengths)} length(s) x {len(options.depths)} depths "
        f"x {options.trials} prompts; per cell 3 teacher-forced passes (+1 traced for "
        f"MemMamba); per model and length one ETMF analysis ({anchors} anchors)",
        flush=True,
    )
    for label, model in models.items():
        cost = forward_cost(model, 512)
        passes = 4 if isinstance(model, MemMambaLM) else 3
        for length in lengths:
            chunk = resolve_chunk_size(model, options.chunk_size, ignore_without_cache=True)
            estimate = estimate_run(
                model,
                length,
                batch=options.trials,
                n_positions=0,
                n_layers_kept=0,
                chunk_size=chunk,
            )
            check_fits(estimate)
            seconds = (
                passes * len(options.depths) * estimate_seconds(model, length, options.trials, cost)
            )
            total += seconds
            print(
                f"  {label} at {format_length(length)}: about {seconds / 60:.1f} min of forward "
                f"passes (measured {cost.fixed * 1e6:.0f} us/token now), peak memory about "
                f"{estimate.total / 2**30:.1f} GiB",
                flush=True,
            )
    print(
        f"  total about {total / 60:.1f} min of forwards (ETMF analysis adds its own)", flush=True
    )
    return total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        help="label=path (checkpoint or training run directory) or a shipped name; repeat",
    )
    parser.add_argument("--lengths", help="comma-separated, e.g. 512,2k,8k")
    parser.add_argument("--trials", type=int, default=10, help="prompts per depth")
    parser.add_argument("--filler", default="standard", choices=FILLERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchors", type=int, default=128, help="ETMF anchors (0: no ETMF)")
    parser.add_argument("--label", default="", help="a line under the title (e.g. which models)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--raw", type=Path, default=ROOT / "runs/passkey-mechanism/raw.json")
    parser.add_argument("--from-raw", action="store_true", help="rewrite --out from --raw")
    args = parser.parse_args(argv)
    if args.from_raw:
        write_table(args.out, json.loads(args.raw.read_text()))
        print(f"wrote {args.out}")
        return
    if not args.model or not args.lengths:
        parser.error("--model and --lengths are required (except with --from-raw)")
    if args.trials < 1:
        raise InputError(f"--trials must be >= 1, got {args.trials}")
    lengths = [parse_length(value) for value in args.lengths.split(",")]
    sources = parse_models(args.model)
    models = {label: load_model(source).eval() for label, source in sources.items()}
    options = CellOptions(trials=args.trials, filler=args.filler, seed=args.seed)
    for length in lengths:  # a too-short length fails here, before any work
        passkey_probe(length, batch=1, filler=args.filler)
    plan(models, lengths, options, args.anchors)
    command = "python benchmarks/passkey_mechanism.py " + " ".join(
        [f"--model {label}={source}" for label, source in sources.items()]
        + [f"--lengths {args.lengths}", f"--trials {args.trials}", f"--filler {args.filler}"]
        + [f"--seed {args.seed}", f"--anchors {args.anchors}"]
        + ([f"--label {shlex.quote(args.label)}"] if args.label else [])
        + ([f"--out {_shown(args.out)}"] if args.out != DEFAULT_OUT else [])
    )
    started = time.perf_counter()
    rows: list[dict] = []
    cells = len(models) * len(lengths) * len(options.depths)
    done = 0
    for label, model in models.items():
        for length in lengths:
            frame = None
            if args.anchors:
                frame = fidelity.analyze(
                    model,
                    length,
                    probe="text",
                    metrics="etmf",
                    anchors=args.anchors,
                    seed=args.seed,
                    progress=False,
                    n_boot=0,
                ).frame
            for depth_index in range(len(options.depths)):
                cell = measure_cell(model, label, length, depth_index, options, frame)
                rows.extend(asdict(row) for row in cell)
                done += 1
                elapsed = time.perf_counter() - started
                print(
                    f"[{done}/{cells}] {label} {format_length(length)} depth "
                    f"{options.depths[depth_index]:g}: {sum(r.right for r in cell)}/{len(cell)} "
                    f"right, needle effect {np.mean([r.needle_effect for r in cell]):.3f} nats; "
                    f"{elapsed:.0f} s, about {elapsed / done * (cells - done):.0f} s left",
                    flush=True,
                )
    record = {
        "command": command,
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "seconds": time.perf_counter() - started,
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()) + " at the end",
        "filler": args.filler,
        "trials": args.trials,
        "depths": list(options.depths),
        "rows": rows,
    }
    write_text_atomically(args.raw, json.dumps(record))
    write_table(args.out, json.loads(json.dumps(record)))  # the keys as in the raw file
    print(f"wrote {args.out} and {args.raw}")


if __name__ == "__main__":
    try:
        main()
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
