"""Probe inputs: windows of real text, passkey and key-value retrieval prompts, random tokens.

Every probe is exactly ``length`` tokens per row and is a pure function of its arguments:
randomness comes from a local ``numpy.random.Generator`` (or ``torch.Generator`` for random
tokens) seeded with ``seed``, never from global state.

Retrieval prompts (``passkey``, ``kv``) end right before the answer, so a model is scored by
greedy decoding from the last position; ``with_answer=True`` appends the answer tokens instead
(teacher forcing) and records their span. Prompts are built from separately encoded pieces, so
the recorded spans are exact under any tokenizer.
"""

from __future__ import annotations

import inspect
import math
import numbers
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fidelity.errors import InputError
from fidelity.probes.corpus import load_corpus, tokenize_corpus
from fidelity.probes.memory_tasks import MEMORY_TASKS, make_memory_task
from fidelity.probes.tokenizer import Tokenizer, as_tokenizer

TASKS = ("text", "passkey", "kv", "random", *MEMORY_TASKS)
TRAINING_TASKS = ("text", "passkey", "kv", "mix", *MEMORY_TASKS)
MIX_PROPORTIONS = {"text": 0.5, "passkey": 0.25, "kv": 0.25}
RETRIEVAL_OPTIONS = {
    "episodes": 1,
    "questions": 1,
    "filler": "standard",
    "repeat_key": False,
    "spacing": "uniform",
}
"""Options of the passkey training rows, defaults first: the most passkey episodes a row holds,
the questions (each followed by its answer) after each needle, the filler ("standard", "text"
or "mixed": either, drawn per row), whether the key's repetition inside the needle is
supervised too, and how the filler is spread ("uniform": at random cuts between every piece;
"far": the questions after the first follow each other closely, so the first question sits
anywhere from the needle to the row's end, as in the evaluation prompt)."""
SPACINGS = ("uniform", "far")
CLOSE_GAP = 16
"""With ``spacing="far"``, the most filler tokens between a question's answer and the next
question."""
MIX_OPTIONS = {**RETRIEVAL_OPTIONS, "shares": list(MIX_PROPORTIONS.values())}
"""Options of ``passkey`` and ``mix`` training batches: the passkey options and, for ``mix``,
the shares of text, passkey and kv rows (normalized)."""
TRAINING_FILLERS = ("standard", "text", "mixed")

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

KV_INTRO = (
    "Below is a list of keys and their values. Memorize them. "
    "I will quiz you about the value of one key."
)
KV_LINE = "{key}: {value}"
KV_QUESTION = "What is the value of key {key}? The value of key {key} is"
KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 6
VALUE_DIGITS = 5
_KEY_BLOCK = 256  # candidate pairs drawn at a time while filling a kv prompt

Span = tuple[int, int]


@dataclass(frozen=True, eq=False)
class ProbeInput:
    """Token ids of a probe and what each row holds.

    ``input_ids`` `(batch, length)` torch.long. Per-row metadata (a tuple with one entry per
    row, empty where the task has none):

    - passkey / kv: ``needle_spans`` ``(start, end)`` token span of the needle (the pass-key
      sentence; the queried ``key: value`` line), ``answers`` the answer text (``"12345"``),
      ``answer_ids`` the answer's tokens as the model should produce them after the prompt
      (they decode to the answer preceded by a space), ``depths`` the needle depth in [0, 1],
      and with ``with_answer=True`` ``answer_spans``, the answer's span at the end of the row.
    - text: ``sources`` the names of the documents the window touches and ``offsets`` the
      window's start within the first of them, in tokens.
    - induction / selective_copy / mqar (:mod:`fidelity.probes.memory_tasks`, always
      teacher-forced): ``answer_positions`` the positions holding the answers,
      ``cue_positions`` where each answer was shown first, ``answer_ids`` the answers.
    """

    input_ids: torch.Tensor
    task: str
    seed: int
    tokenizer_name: str
    with_answer: bool = False
    needle_spans: tuple[Span, ...] = ()
    answers: tuple[str, ...] = ()
    answer_ids: tuple[tuple[int, ...], ...] = ()
    answer_spans: tuple[Span, ...] = ()
    depths: tuple[float, ...] = ()
    sources: tuple[tuple[str, ...], ...] = ()
    offsets: tuple[int, ...] = ()
    answer_positions: tuple[tuple[int, ...], ...] = ()
    cue_positions: tuple[tuple[int, ...], ...] = ()

    @property
    def batch(self) -> int:
        """Number of rows."""
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        """Tokens per row."""
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class _RetrievalRow:
    """One retrieval prompt: ``ids`` `(length,)` and its spans."""

    ids: np.ndarray
    needle_span: Span
    answer: str
    answer_ids: tuple[int, ...]
    answer_span: Span | None


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; TypeError for non-integers, ValueError if too small."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_depth(depth: object) -> float | None:
    """``None`` (a random depth per row) or a number in [0, 1]."""
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real):
        raise TypeError(f"depth must be a number in [0, 1] or None, got {depth!r}")
    if not 0.0 <= float(depth) <= 1.0:  # also rejects NaN
        raise InputError(f"depth must be in [0, 1] (0: needle first, 1: last), got {depth}")
    return float(depth)


def _check_common(length: object, batch: object, seed: object) -> tuple[int, int, int]:
    """Validated ``(length, batch, seed)``."""
    return (
        _check_count("length", length),
        _check_count("batch", batch),
        _check_count("seed", seed, minimum=0),
    )


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`(n_tokens,)` int64 ids of ``text``."""
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _filler(unit: np.ndarray, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` tokens of ``unit`` repeated, `(n_tokens,)`."""
    return np.resize(unit, n_tokens)


FILLERS = ("standard", "text")


def _check_filler(filler: object) -> str:
    if filler not in FILLERS:
        raise InputError(f"filler must be one of {', '.join(FILLERS)}, got {filler!r}")
    return str(filler)


class _TextFiller:
    """Filler cut from real text: ``take(rng, n)`` is a window of ``n`` tokens of the default
    corpus's ``split`` at a random offset."""

    def __init__(self, tokenizer: Tokenizer, split: str) -> None:
        self.ids = tokenize_corpus(load_corpus(None, split=split), tokenizer).ids

    def take(self, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
        start = int(rng.integers(0, self.ids.shape[0] - n_tokens + 1))
        return self.ids[start : start + n_tokens].astype(np.int64)


def _row_depths(depth: float | None, batch: int, rng: np.random.Generator) -> list[float]:
    """``depth`` for every row, or a uniform draw in [0, 1] per row when ``None``."""
    if depth is None:
        return rng.uniform(0.0, 1.0, size=batch).tolist()
    return [depth] * batch


def _retrieval_probe(
    task: str,
    rows: Sequence[_RetrievalRow],
    depths: Sequence[float],
    seed: int,
    tokenizer: Tokenizer,
    with_answer: bool,
) -> ProbeInput:
    """The :class:`ProbeInput` of retrieval ``rows``, stacked to `(batch, length)`."""
    return ProbeInput(
        input_ids=torch.from_numpy(np.stack([row.ids for row in rows])),
        task=task,
        seed=seed,
        tokenizer_name=tokenizer.name,
        with_answer=with_answer,
        needle_spans=tuple(row.needle_span for row in rows),
        answers=tuple(row.answer for row in rows),
        answer_ids=tuple(row.answer_ids for row in rows),
        answer_spans=tuple(row.answer_span for row in rows if row.answer_span is not None),
        depths=tuple(depths),
    )


def _assemble(
    pieces: Sequence[np.ndarray],
    needle_index: int,
    answer: str,
    answer_ids: np.ndarray,
    with_answer: bool,
) -> _RetrievalRow:
    """Concatenate prompt ``pieces`` (plus the answer when ``with_answer``); the needle is
    ``pieces[needle_index]``."""
    needle_start = sum(piece.shape[0] for piece in pieces[:needle_index])
    needle_span = (needle_start, needle_start + pieces[needle_index].shape[0])
    if with_answer:
        pieces = [*pieces, answer_ids]
    ids = np.concatenate(pieces)
    answer_span = (ids.shape[0] - answer_ids.shape[0], ids.shape[0]) if with_answer else None
    return _RetrievalRow(ids, needle_span, answer, tuple(answer_ids.tolist()), answer_span)


def passkey_probe(
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    depth: float | None = None,
    with_answer: bool = False,
    filler: str = "standard",
    split: str = "heldout",
) -> ProbeInput:
    """Passkey retrieval prompts (Landmark Attention / LongLoRA / DeciMamba format).

    Each row: the intro line, filler, the needle "The pass key is KEY. Remember it. KEY is the
    pass key." after a ``depth`` fraction of the filler, more filler, and "What is the pass
    key? The pass key is" (pieces joined by newlines). ``filler``: "standard" ("The grass is
    green. ..." repeated and cut to fit) or "text" (one window of the default corpus's
    ``split`` text, held out by default, cut at the needle). KEY is 5 digits drawn per row from
    ``seed``; ``depth=None`` draws a depth per row. Returns a :class:`ProbeInput` with
    ``input_ids`` `(batch, length)`. Raises ``ValueError`` when ``length`` cannot hold the
    prompt without filler (the minimum is in the message).
    """
    length, batch, seed = _check_common(length, batch, seed)
    depth = _check_depth(depth)
    filler = _check_filler(filler)
    tokenizer = as_tokenizer(tokenizer)
    text = _TextFiller(tokenizer, split) if filler == "text" else None
    rng = np.random.default_rng(seed)
    depths = _row_depths(depth, batch, rng)
    head = _encode(tokenizer, PASSKEY_INTRO + "\n")
    newline = _encode(tokenizer, "\n")
    question = _encode(tokenizer, "\n" + PASSKEY_QUESTION)
    filler_unit = _encode(tokenizer, FILLER + " ")
    rows = []
    for row_depth in depths:
        key = str(int(rng.integers(10**4, 10**5)))
        needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
        answer_ids = _encode(tokenizer, " " + key)
        fixed = sum(piece.shape[0] for piece in (head, newline, needle, newline, question))
        fixed += answer_ids.shape[0] if with_answer else 0
        n_filler = length - fixed
        if n_filler < 0:
            raise InputError(
                f"passkey needs length >= {fixed} tokens with tokenizer {tokenizer.name!r} "
                f"(the prompt without filler), got {length}"
            )
        n_before = round(row_depth * n_filler)
        if text is None:
            before = _filler(filler_unit, n_before)
            after = _filler(filler_unit, n_filler - n_before)
        else:
            filling = text.take(rng, n_filler)
            before, after = filling[:n_before], filling[n_before:]
        pieces = [head, before, newline, needle, newline, after, question]
        rows.append(_assemble(pieces, 3, key, answer_ids, with_answer))
    return _retrieval_probe("passkey", rows, depths, seed, tokenizer, with_answer)


def _draw_pairs(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` random (key, value) pairs: 6 alphanumeric characters, 5 digits."""
    alphabet = np.frombuffer(KEY_ALPHABET.encode("ascii"), dtype=np.uint8)
    key_codes = alphabet[rng.integers(0, alphabet.shape[0], size=(count, KEY_LENGTH))]
    keys = key_codes.view(f"S{KEY_LENGTH}").ravel().tolist()  # (count,) bytes
    values = rng.integers(10 ** (VALUE_DIGITS - 1), 10**VALUE_DIGITS, size=count).tolist()
    return [(key.decode("ascii"), str(value)) for key, value in zip(keys, values, strict=True)]


class _KvConstants(NamedTuple):
    """The encoded pieces every kv prompt shares."""

    head: np.ndarray
    newline: np.ndarray
    filler_unit: np.ndarray

    @classmethod
    def encode(cls, tokenizer: Tokenizer) -> _KvConstants:
        return cls(
            _encode(tokenizer, KV_INTRO + "\n"),
            _encode(tokenizer, "\n"),
            _encode(tokenizer, FILLER + " "),
        )


def _other_lines(
    queried_key: str,
    n_pairs: int | None,
    budget: int,
    used: int,
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    newline: np.ndarray,
) -> tuple[list[np.ndarray], int]:
    """Encoded ``KEY: VALUE`` lines besides the queried one, with keys unique in the row:
    ``n_pairs - 1`` of them (fewer if they do not fit), or as many as fit when ``n_pairs`` is
    None; and the tokens used, counting ``used`` tokens already taken and one newline a line."""
    seen = {queried_key}
    lines: list[np.ndarray] = []
    wanted = math.inf if n_pairs is None else n_pairs - 1
    while len(lines) < wanted:
        for key, value in _draw_pairs(rng, int(min(_KEY_BLOCK, wanted - len(lines)))):
            if key in seen:
                continue
            line = _encode(tokenizer, KV_LINE.format(key=key, value=value))
            if used + line.shape[0] + newline.shape[0] > budget:
                return lines, used
            seen.add(key)
            lines.append(line)
            used += line.shape[0] + newline.shape[0]
    return lines, used


def _kv_row(
    length: int,
    depth: float,
    n_pairs: int | None,
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    constants: _KvConstants,
    with_answer: bool,
) -> _RetrievalRow:
    """One kv prompt: intro, filler padding, ``key: value`` lines, the question."""
    head, newline, filler_unit = constants
    ((queried_key, queried_value),) = _draw_pairs(rng, 1)
    question = _encode(tokenizer, KV_QUESTION.format(key=queried_key))
    answer_ids = _encode(tokenizer, " " + queried_value)
    budget = length - head.shape[0] - question.shape[0]
    budget -= answer_ids.shape[0] if with_answer else 0
    queried_line = _encode(tokenizer, KV_LINE.format(key=queried_key, value=queried_value))
    used = queried_line.shape[0] + newline.shape[0]
    if used > budget:
        raise InputError(
            f"kv needs length >= {length - budget + used} tokens with tokenizer "
            f"{tokenizer.name!r} (one pair and the question), got {length}"
        )
    others, used = _other_lines(queried_key, n_pairs, budget, used, rng, tokenizer, newline)
    if n_pairs is not None and len(others) + 1 < n_pairs:
        raise InputError(
            f"n_pairs={n_pairs} does not fit in length {length}: at most about "
            f"{len(others) + 1} pairs fit with tokenizer {tokenizer.name!r}"
        )
    position = round(depth * len(others))
    ordered = [*others[:position], queried_line, *others[position:]]
    leftover = budget - used  # filled with filler text ending in a newline where it fits
    if leftover >= newline.shape[0]:
        padding = np.concatenate([_filler(filler_unit, leftover - newline.shape[0]), newline])
    else:
        padding = _filler(filler_unit, leftover)
    pieces = [head, padding]
    for line in ordered:
        pieces += [line, newline]
    return _assemble([*pieces, question], 2 + 2 * position, queried_value, answer_ids, with_answer)


def kv_probe(
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    n_pairs: int | None = None,
    depth: float | None = None,
    with_answer: bool = False,
) -> ProbeInput:
    """Multi-key key-value retrieval prompts (Phonebook / RULER style).

    Each row: an intro line, filler padding (the passkey filler cut to what the pairs leave,
    ending in a newline; less than one line when ``n_pairs`` is None), ``n_pairs`` lines
    ``KEY: VALUE`` (6-character alphanumeric keys, unique within the row; 5-digit values),
    then "What is the value of key KEY? The value of key KEY is" for one of the keys.
    ``n_pairs=None`` fits as many pairs as the length allows; the queried pair sits at index
    ``round(depth * (n_pairs - 1))`` (``depth=None`` draws one per row). Returns a
    :class:`ProbeInput` with ``input_ids`` `(batch, length)`; the needle span is the queried
    line.
    """
    length, batch, seed = _check_common(length, batch, seed)
    depth = _check_depth(depth)
    if n_pairs is not None:
        n_pairs = _check_count("n_pairs", n_pairs)
    tokenizer = as_tokenizer(tokenizer)
    rng = np.random.default_rng(seed)
    depths = _row_depths(depth, batch, rng)
    constants = _KvConstants.encode(tokenizer)
    rows = [
        _kv_row(length, row_depth, n_pairs, rng, tokenizer, constants, with_answer)
        for row_depth in depths
    ]
    return _retrieval_probe("kv", rows, depths, seed, tokenizer, with_answer)


def text_probe(
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    paths: str | Path | Sequence[str | Path] | None = None,
    split: str | None = None,
    text_field: str = "text",
) -> ProbeInput:
    """Windows of real text: ``batch`` windows of ``length`` tokens at random offsets.

    ``paths``: ``.txt`` / ``.md`` / ``.jsonl`` (field ``text_field``) files or directories
    (searched recursively); ``None`` takes the default corpus, the Python standard library's
    ``.py`` sources (see :mod:`fidelity.probes.corpus`). ``split``: "heldout", "train" or
    "all" (the splits hold disjoint files); default "heldout" for the default corpus and
    "all" for ``paths`` (the user's text is used whole). Rows are distinct windows whenever the
    corpus has at least ``batch`` of them; windows may span document boundaries (documents
    are separated by a blank line). Returns a :class:`ProbeInput` with ``input_ids``
    `(batch, length)`, ``sources`` and ``offsets``. Raises ``ValueError`` when ``length``
    exceeds the tokens available (the count is in the message).
    """
    length, batch, seed = _check_common(length, batch, seed)
    tokenizer = as_tokenizer(tokenizer)
    corpus = tokenize_corpus(load_corpus(paths, split=split, text_field=text_field), tokenizer)
    if length > len(corpus):
        raise InputError(
            f"length {length} exceeds the text available: {corpus.description} holds "
            f"{len(corpus)} tokens"
        )
    n_windows = len(corpus) - length + 1
    rng = np.random.default_rng(seed)
    starts = rng.choice(n_windows, size=batch, replace=n_windows < batch).tolist()
    windows = np.stack([corpus.ids[start : start + length] for start in starts])
    located = [corpus.window_sources(start, start + length) for start in starts]
    return ProbeInput(
        input_ids=torch.from_numpy(windows.astype(np.int64)),
        task="text",
        seed=seed,
        tokenizer_name=tokenizer.name,
        sources=tuple(names for names, _ in located),
        offsets=tuple(offset for _, offset in located),
    )


def random_probe(
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    vocab_size: int | None = None,
) -> ProbeInput:
    """Uniform random token ids (a control), `(batch, length)`: over ``[0, vocab_size)`` when
    given (``fidelity.analyze`` passes the model's vocabulary), else the tokenizer's."""
    length, batch, seed = _check_common(length, batch, seed)
    tokenizer = as_tokenizer(tokenizer)
    if vocab_size is None:
        vocab_size = tokenizer.vocab_size
    vocab_size = _check_count("vocab_size", vocab_size, minimum=2)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator, dtype=torch.long)
    return ProbeInput(input_ids=input_ids, task="random", seed=seed, tokenizer_name=tokenizer.name)


def memory_probe(
    task: str,
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    **options: object,
) -> ProbeInput:
    """A memory task (induction, selective_copy, mqar) as a :class:`ProbeInput`; these tasks
    have their own small vocabulary, so ``tokenizer`` must be None."""
    if tokenizer is not None:
        raise InputError(f"task {task!r} uses its own vocabulary; it takes no tokenizer")
    built = make_memory_task(task, length, batch=batch, seed=seed, **options)
    return ProbeInput(
        input_ids=built.input_ids,
        task=task,
        seed=seed,
        tokenizer_name=f"{task} vocabulary ({built.vocab_size} tokens)",
        with_answer=True,
        answer_ids=tuple(tuple(row) for row in built.answers.tolist()),
        answer_positions=tuple(tuple(row) for row in built.answer_positions.tolist()),
        cue_positions=tuple(tuple(row) for row in built.cue_positions.tolist()),
    )


_PROBES = {"text": text_probe, "passkey": passkey_probe, "kv": kv_probe, "random": random_probe}
_COMMON_ARGUMENTS = ("length", "batch", "seed", "tokenizer")


def make_probe(
    task: str,
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    **task_options: object,
) -> ProbeInput:
    """The probe ``task`` (one of :data:`TASKS`), ``input_ids`` `(batch, length)`.

    ``task_options`` go to the task's function: text: ``paths``, ``split``, ``text_field``;
    passkey: ``depth``, ``with_answer``, ``filler``, ``split``; kv: ``n_pairs``, ``depth``,
    ``with_answer``; random: ``vocab_size``; induction: ``vocab_size``; selective_copy:
    ``vocab_size``, ``n_data``; mqar: ``vocab_size``, ``n_pairs``, ``n_queries``, ``replace``.
    Raises ``InputError`` for an unknown task and ``TypeError`` for an option the task does
    not take.
    """
    if task in MEMORY_TASKS:
        return memory_probe(
            task, length, batch=batch, seed=seed, tokenizer=tokenizer, **task_options
        )
    if task not in _PROBES:
        raise InputError(f"unknown probe task {task!r}; expected one of {', '.join(TASKS)}")
    probe = _PROBES[task]
    accepted = [
        name for name in inspect.signature(probe).parameters if name not in _COMMON_ARGUMENTS
    ]
    unknown = sorted(set(task_options) - set(accepted))
    if unknown:
        raise TypeError(
            f"task {task!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    return probe(length, batch=batch, seed=seed, tokenizer=tokenizer, **task_options)


class _Episode(NamedTuple):
    """The fixed pieces of one passkey episode: the needle line with its leading and trailing
    newlines, where the repeated key sits in it (``repeat``: a span of ``needle``), the
    question with its leading newline and the answer."""

    needle: np.ndarray
    repeat: Span
    question: np.ndarray
    answer: np.ndarray

    @classmethod
    def encode(cls, key: str, tokenizer: Tokenizer, newline: np.ndarray) -> _Episode:
        first, second = PASSKEY_NEEDLE.split("{key}", 1)[1].split("{key}")
        head = np.concatenate([newline, _encode(tokenizer, PASSKEY_NEEDLE.split("{key}")[0])])
        head = np.concatenate([head, _encode(tokenizer, key + first)])
        repeat = _encode(tokenizer, key)
        needle = np.concatenate([head, repeat, _encode(tokenizer, second), newline])
        span = (head.shape[0], head.shape[0] + repeat.shape[0])
        return cls(
            needle, span, _encode(tokenizer, "\n" + PASSKEY_QUESTION), _encode(tokenizer, " " + key)
        )

    def size(self, questions: int, separator: int) -> int:
        """Tokens of the needle and ``questions`` questions with their answers, separated by
        ``separator`` tokens."""
        asked = self.question.shape[0] + self.answer.shape[0]
        return self.needle.shape[0] + questions * asked + (questions - 1) * separator


def _passkey_training_row(
    length: int,
    episodes: int,
    questions: int,
    filler: str,
    repeat_key: bool,
    spacing: str,
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    text: _TextFiller,
) -> tuple[np.ndarray, np.ndarray]:
    """One passkey training row ``(ids, mask)``, each `(length,)`: the intro, then between 1
    and ``episodes`` passkey episodes (filler, needle, then ``questions`` times filler,
    question, answer) back to back, separated by newlines, each with its own key; the last
    answer ends the row. Questions after the first can copy the answer from the previous one
    (the same phrase, "The pass key is", precedes key and answer), as the induction task's
    repeated queries do: many short copies of the pattern the needle needs. The filler
    (``"standard"``, ``"text"`` or ``"mixed"``: either, drawn per row) is split at random cut
    points (``spacing="uniform"``), so episode lengths and needle depths vary; with
    ``spacing="far"`` the gaps between an episode's questions are at most :data:`CLOSE_GAP`
    tokens and the rest is cut at random before each needle and between it and its first
    question, so that question's distance from the needle spans the whole episode, as in the
    evaluation prompt (a row of one episode and one question is that prompt with its answer).
    ``mask`` marks the positions predicting every episode's answer and,
    with ``repeat_key``, the key's repetition inside the needle ("... Remember it. KEY is the
    pass key.", a copy from a few tokens back: an easy first step towards the answer's copy
    from far back)."""
    head = _encode(tokenizer, PASSKEY_INTRO + "\n")
    newline = _encode(tokenizer, "\n")
    if filler == "mixed":
        filler = TRAINING_FILLERS[int(rng.integers(0, 2))]
    count = int(rng.integers(1, episodes + 1))
    keys = [str(int(rng.integers(10**4, 10**5))) for _ in range(count)]
    parts = [_Episode.encode(key, tokenizer, newline) for key in keys]
    separator = newline.shape[0]
    sizes = [part.size(questions, separator) + separator for part in parts]
    fixed = head.shape[0] + sum(sizes) - separator
    while fixed > length and len(parts) > 1:  # too many episodes for the length: drop some
        parts.pop()
        fixed -= sizes.pop()
    if fixed > length:
        raise InputError(
            f"passkey training rows need length >= {fixed} tokens with tokenizer "
            f"{tokenizer.name!r}, got {length}"
        )
    n_filler = length - fixed
    gaps = iter(_filler_gaps(n_filler, len(parts), questions, spacing, rng))
    if filler == "text":
        filling = text.take(rng, n_filler)
    else:
        filling = _filler(_encode(tokenizer, FILLER + " "), n_filler)
    pieces, targets, offset = [head], [], 0

    def add(piece: np.ndarray, supervised: Span | None = None) -> None:
        used = sum(p.shape[0] for p in pieces)
        if supervised is not None:
            targets.append((used + supervised[0], used + supervised[1]))
        pieces.append(piece)

    def fill() -> None:
        nonlocal offset
        gap = next(gaps)
        add(filling[offset : offset + gap])
        offset += gap

    for index, part in enumerate(parts):
        if index:
            add(newline)
        fill()
        add(part.needle, part.repeat if repeat_key else None)
        for question in range(questions):
            if question:
                add(newline)
            fill()
            add(part.question)
            add(part.answer, (0, part.answer.shape[0]))
    ids = np.concatenate(pieces)
    mask = np.zeros(length, dtype=bool)
    for start, end in targets:
        mask[start - 1 : end - 1] = True
    return ids, mask


def _filler_gaps(
    n_filler: int, episodes: int, questions: int, spacing: str, rng: np.random.Generator
) -> list[int]:
    """The filler tokens before each needle and each question, in row order (``episodes`` times
    ``1 + questions`` gaps summing to ``n_filler``; see :func:`_passkey_training_row`)."""
    slots = (1 + questions) * episodes
    if spacing == "uniform":
        cuts = np.sort(rng.integers(0, n_filler + 1, size=slots - 1))
        return np.diff(np.concatenate([[0], cuts, [n_filler]])).tolist()
    close = rng.integers(0, CLOSE_GAP + 1, size=(episodes, questions - 1))
    while close.sum() > n_filler:  # too little filler for the close gaps: halve them
        close //= 2
    far = n_filler - int(close.sum())
    cuts = np.sort(rng.integers(0, far + 1, size=2 * episodes - 1))
    spread = np.diff(np.concatenate([[0], cuts, [far]])).reshape(episodes, 2)
    return np.concatenate([spread, close], axis=1).reshape(-1).tolist()


def _passkey_training_rows(
    length: int,
    batch: int,
    seed: int,
    tokenizer: Tokenizer,
    split: str,
    episodes: int,
    questions: int,
    filler: str,
    repeat_key: bool,
    spacing: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rows of :func:`_passkey_training_row` from ``seed``, filler text from
    ``split``: `(batch, length)` ids and mask."""
    rng = np.random.default_rng(seed)
    text = _TextFiller(tokenizer, split) if filler != "standard" else None
    rows = [
        _passkey_training_row(
            length, episodes, questions, filler, repeat_key, spacing, rng, tokenizer, text
        )
        for _ in range(batch)
    ]
    ids = torch.from_numpy(np.stack([ids for ids, _ in rows]))
    return ids, torch.from_numpy(np.stack([mask for _, mask in rows]))


def _check_shares(shares: object) -> list[float]:
    """The mix shares (text, passkey, kv) normalized to sum to 1."""
    if (
        not isinstance(shares, list | tuple)
        or len(shares) != len(MIX_PROPORTIONS)
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in shares)
        or not all(v >= 0 for v in shares)
        or not sum(shares) > 0
    ):
        raise InputError(
            f"shares must be {len(MIX_PROPORTIONS)} non-negative numbers (text, passkey, kv) "
            f"with a positive sum, e.g. [0.5, 0.5, 0], got {shares!r}"
        )
    return [float(v) / float(sum(shares)) for v in shares]


def check_retrieval_options(options: dict | None) -> dict:
    """``options`` of a passkey or mix training batch completed with :data:`MIX_OPTIONS`;
    raises ``InputError`` for an unknown option or a bad value."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(MIX_OPTIONS))
    if unknown:
        raise InputError(
            f"unknown option(s) {', '.join(unknown)} for passkey and mix training batches; "
            f"they take: {', '.join(MIX_OPTIONS)}"
        )
    options = {**MIX_OPTIONS, **options}
    _check_shares(options["shares"])
    for name in ("episodes", "questions"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(options["repeat_key"], bool):
        raise InputError(f"repeat_key must be true or false, got {options['repeat_key']!r}")
    if options["filler"] not in TRAINING_FILLERS:
        raise InputError(
            f"filler must be one of {', '.join(TRAINING_FILLERS)}, got {options['filler']!r}"
        )
    if options["spacing"] not in SPACINGS:
        raise InputError(
            f"spacing must be one of {', '.join(SPACINGS)}, got {options['spacing']!r}"
        )
    return options


def _task_rows(
    task: str,
    length: int,
    batch: int,
    seed: int,
    tokenizer: Tokenizer,
    split: str,
    paths: str | Path | Sequence[str | Path] | None,
    text_field: str,
    options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``training_batch`` for one of "text", "passkey", "kv"; ``options`` the checked passkey
    options (:func:`check_retrieval_options`)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    if task == "passkey" and options != RETRIEVAL_OPTIONS:
        return _passkey_training_rows(length, batch, seed, tokenizer, split, **options)
    if task == "text":
        probe = text_probe(
            length,
            batch=batch,
            seed=seed,
            tokenizer=tokenizer,
            paths=paths,
            split=split,
            text_field=text_field,
        )
        mask[:, :-1] = True
        return probe.input_ids, mask
    probe = _PROBES[task](length, batch=batch, seed=seed, tokenizer=tokenizer, with_answer=True)
    for row, (start, end) in enumerate(probe.answer_spans):
        mask[row, start - 1 : end - 1] = True  # positions whose next token is an answer token
    return probe.input_ids, mask


def training_batch(
    task: str,
    length: int,
    batch: int,
    seed: int,
    tokenizer: Tokenizer | str | Path | None = None,
    split: str = "train",
    *,
    paths: str | Path | Sequence[str | Path] | None = None,
    text_field: str = "text",
    task_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: ``input_ids`` `(batch, length)` long, ``loss_mask`` `(batch, length)` bool.

    Mask convention: the logits at position ``t`` predict token ``t + 1``;
    ``loss_mask[b, t]`` is True when that prediction counts in the loss. The last column is
    always False (no target). Use it as
    ``cross_entropy(logits[:, :-1][mask[:, :-1]], input_ids[:, 1:][mask[:, :-1]])``.

    - "text": windows of the ``split`` text (``paths`` / ``text_field`` as in
      :func:`text_probe`); every position with a target is marked.
    - "passkey" / "kv": prompt + answer (teacher-forced, the answer at the end of the row);
      only the positions predicting answer tokens are marked. The filler and the pair lines
      are deliberately not marked: the passkey filler is one sentence repeated, learned in a
      few steps and afterwards thousands of zero-loss tokens that dilute the answer's share
      of the mean loss by 100x or more; kv keys and values are uniformly random characters
      whose loss cannot go below ~log(62) per key character, pure gradient noise. The
      structure of the text around them is learned from "text" rows.
    - "mix": each row independently "text" (50%), "passkey" (25%) or "kv" (25%)
      (:data:`MIX_PROPORTIONS`, or the option ``shares``), chosen from ``seed``.
    - ``task_options`` of "passkey" and "mix" (:data:`MIX_OPTIONS`): ``episodes``,
      ``questions``, ``filler``, ``repeat_key``, ``spacing`` make passkey rows dense (several
      episodes and questions a row, every answer supervised; :func:`_passkey_training_row`);
      without them a passkey row is the probe with its answer, as above.

    - "induction" / "selective_copy" / "mqar" (:mod:`fidelity.probes.memory_tasks`, with
      ``task_options``): only the positions predicting answers are marked. Every other
      token of these tasks is uniform noise or a fixed filler (nothing to learn, as above),
      and the answers are what the task measures; MQAR still has ``n_pairs`` answers a row.

    Needle depths, keys and text windows vary per row, all from ``seed``.
    """
    if task not in TRAINING_TASKS:
        raise InputError(
            f"unknown training task {task!r}; expected one of {', '.join(TRAINING_TASKS)}"
        )
    length, batch, seed = _check_common(length, batch, seed)
    if task in MEMORY_TASKS:
        built = make_memory_task(task, length, batch=batch, seed=seed, **(task_options or {}))
        return built.input_ids, built.loss_mask
    if task_options and task not in ("passkey", "mix"):
        raise TypeError(f"task {task!r} takes no task options, got {sorted(task_options)}")
    options = check_retrieval_options(task_options)
    tokenizer = as_tokenizer(tokenizer)
    if task != "mix":
        if "shares" in (task_options or {}):
            raise InputError("the option shares is for --task mix only")
        options.pop("shares")
        return _task_rows(task, length, batch, seed, tokenizer, split, paths, text_field, options)
    shares = _check_shares(options.pop("shares"))
    rng = np.random.default_rng(seed)
    names = list(MIX_PROPORTIONS)
    choices = rng.choice(len(names), size=batch, p=shares)
    task_seeds = rng.integers(0, 2**62, size=len(names)).tolist()
    input_ids = torch.empty(batch, length, dtype=torch.long)
    loss_mask = torch.empty(batch, length, dtype=torch.bool)
    for index, (name, task_seed) in enumerate(zip(names, task_seeds, strict=True)):
        rows = torch.from_numpy(np.flatnonzero(choices == index))
        if rows.numel():
            ids, mask = _task_rows(
                name, length, rows.numel(), task_seed, tokenizer, split, paths, text_field, options
            )
            input_ids.index_copy_(0, rows, ids)  # far faster than x[rows] = y on CPU
            loss_mask.index_copy_(0, rows, mask)
    return input_ids, loss_mask
