"""Synthetic memory tasks that tiny models learn: induction, selective copying, MQAR.

Each task is a pure function of ``(length, batch, seed, options)``: every draw comes from a
local ``numpy.random.Generator`` seeded with ``seed``. Tokens are ids of a small task
vocabulary (``vocab_size``, 16 by default for induction and selective copying, as in the Mamba
paper), not bytes; a model must be built with at least that vocabulary (``fidelity train
--task NAME`` does so).

Rows are teacher-forced: the answers sit in the row itself, at the positions listed in
:attr:`MemoryTask.answer_positions`, and the logits at position ``t - 1`` must predict the
token at each answer position ``t``. Accuracy is argmax agreement at those positions
(:func:`answer_accuracy`); for induction (one answer, last in the row) this is exactly
greedy decoding.

- ``induction`` (Mamba paper, Gu & Dao 2023, sec. 4.1.2; Olsson et al. 2022): random data
  tokens ``0 .. vocab_size - 2``; the trigger token ``vocab_size - 1`` appears once at a
  random position ``p`` (``p + 1 <= length - 3``), and again at ``length - 2``; the last token
  is the answer, the token at ``p + 1``. Training uses ``n_queries`` (e.g. 16): the trigger
  recurs, always followed by the answer, so a row supervises that many answers instead of
  one (with one, a 2-layer model stayed at chance for 2,700 steps on this CPU); the test
  form is the paper's, ``n_queries=1``.
- ``selective_copy`` (Mamba paper, sec. 4.1.1): ``n_data`` data tokens (``1 .. vocab_size -
  2``) at random, sorted positions of a region filled with the noise token ``0``; then the
  separator ``vocab_size - 1``; then the data tokens again, in order (the answers). The
  paper marks the answer positions with special tokens and predicts all of them at once; we
  let the model generate them after one separator (autoregressive copying), the form the rest
  of the toolkit's tasks take.
- ``mqar`` (Zoology, Arora et al. 2023): ``n_pairs`` key-value pairs (distinct keys from
  ``1 .. vocab_size // 2 - 1``, distinct values from ``vocab_size // 2 .. vocab_size - 1``),
  then a region of noise tokens ``0`` holding ``n_queries`` queries (default: one per pair)
  at random places: a key of the row, then its value (the answer). By default
  (``replace=True``) each query's key is drawn from the row's keys anew, so a key may be asked
  several times or never; ``replace=False`` asks distinct keys (every key once by default).
  Because the answers are teacher-forced, the distinct-key form can be played without
  binding keys to values: a model that rules out the values already answered reaches (1 +
  1/2 + ... + 1/n) / n (52% at 4 pairs); with replacement the answers seen rule nothing
  out and the no-binding level is 1 / n_pairs. (Zoology asks every key once but leaves the
  answers out of the row, which has the same effect.)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from fidelity.errors import InputError

MEMORY_TASKS = ("induction", "selective_copy", "mqar")
DEFAULT_VOCAB = {"induction": 16, "selective_copy": 16, "mqar": 64}


@dataclass(frozen=True, eq=False)
class MemoryTask:
    """A batch of one memory task.

    ``input_ids`` `(batch, length)` long. ``answer_positions`` `(batch, n_answers)` long: the
    positions holding answers (every row has the same number). ``cue_positions`` `(batch,
    n_answers)`: where each answer was shown first (induction: the follower of the first
    trigger; selective copy: the data token; mqar: the pair's value). ``vocab_size`` is the
    task vocabulary; ``options`` the task options used.
    """

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    cue_positions: torch.Tensor
    task: str
    seed: int
    vocab_size: int
    options: dict

    @property
    def loss_mask(self) -> torch.Tensor:
        """`(batch, length)` bool: True at ``t`` when the logits at ``t`` predict an answer
        (``t + 1`` is an answer position)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        mask.scatter_(1, self.answer_positions - 1, True)
        return mask

    @property
    def answers(self) -> torch.Tensor:
        """`(batch, n_answers)` the answer tokens."""
        return self.input_ids.gather(1, self.answer_positions)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {min(minimum, 1)}, got {value!r}")
    if value < min(minimum, 1):
        raise InputError(f"{name} must be an int >= {min(minimum, 1)}, got {value}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum} here (the task's minimum), got {value}")
    return int(value)


def induction(
    length: int, *, batch: int = 1, seed: int = 0, vocab_size: int = 16, n_queries: int = 1
) -> MemoryTask:
    """Induction-head rows (see the module docstring), ``length >= 4``, ``vocab_size >= 3``.

    ``n_queries > 1`` (for training: more supervised positions per row) repeats the trigger,
    each time followed by the answer, at ``n_queries - 1`` random places after the first
    occurrence, besides the final one: occurrences take random, non-overlapping two-token
    slots ``(2s, 2s + 1)``, the earliest is the cue and every later follower is an answer.
    """
    n_queries = _count("n_queries", n_queries, 1)
    length = _count("length", length, max(4, 2 * n_queries + 2))
    vocab_size = _count("vocab_size", vocab_size, 3)
    rng = _rng(batch, seed)
    trigger = vocab_size - 1
    ids = rng.integers(0, trigger, size=(batch, length))
    rows = np.arange(batch)[:, None]
    if n_queries == 1:
        first = rng.integers(0, length - 3, size=(batch, 1))  # its follower is <= length - 3
        queries = np.empty((batch, 0), dtype=np.int64)
    else:  # the cue and n_queries - 1 queries in distinct two-token slots before the end
        chosen = np.sort(rng.random((batch, (length - 2) // 2)).argsort(axis=1)[:, :n_queries])
        first, queries = 2 * chosen[:, :1], 2 * chosen[:, 1:]
    ends = np.full((batch, 1), length - 2)
    starts = np.concatenate([queries, ends], axis=1)  # every later trigger
    ids[rows, first] = trigger
    ids[rows, starts] = trigger
    ids[rows, starts + 1] = ids[rows, first + 1]
    return _task(
        "induction",
        ids,
        starts + 1,
        np.broadcast_to(first + 1, starts.shape),
        seed,
        vocab_size,
        {"n_queries": n_queries},
    )


def selective_copy(
    length: int, *, batch: int = 1, seed: int = 0, vocab_size: int = 16, n_data: int = 16
) -> MemoryTask:
    """Selective-copying rows (see the module docstring); ``length >= 2 * n_data + 1``."""
    n_data = _count("n_data", n_data, 1)
    length = _count("length", length, 2 * n_data + 1)
    vocab_size = _count("vocab_size", vocab_size, 3)
    rng = _rng(batch, seed)
    region = length - n_data - 1
    ids = np.zeros((batch, length), dtype=np.int64)
    data = rng.integers(1, vocab_size - 1, size=(batch, n_data))
    cues = np.sort(rng.random((batch, region)).argsort(axis=1)[:, :n_data], axis=1)
    rows = np.arange(batch)[:, None]
    ids[rows, cues] = data
    ids[:, region] = vocab_size - 1
    answers = np.broadcast_to(np.arange(region + 1, length), (batch, n_data))
    ids[rows, answers] = data
    return _task("selective_copy", ids, answers, cues, seed, vocab_size, {"n_data": n_data})


def mqar(
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    vocab_size: int = 64,
    n_pairs: int = 8,
    n_queries: int | None = None,
    replace: bool = True,
) -> MemoryTask:
    """Multi-query associative recall rows (see the module docstring); ``vocab_size >= 2 *
    n_pairs + 2`` and ``length >= 2 * (n_pairs + n_queries)``.

    ``n_queries`` (default ``n_pairs``) queries follow the pairs. ``replace=True`` (the
    default) draws each query's key uniformly from the pairs, independently (a key may be
    asked several times or never), so the answers seen before tell nothing about the next
    one without the key: the no-binding level is 1 / n_pairs (values are distinct), and any
    number of queries per row is possible. ``replace=False`` asks distinct keys
    (``n_queries <= n_pairs``; with the default every key once): a model that knows the
    row's values but not which key holds which can then rule out the values already
    answered and reach (1 + 1/2 + ... + 1/n) / n without binding; this was the default
    until 2 layers x 64 models were seen to stop at exactly that level.
    """
    n_pairs = _count("n_pairs", n_pairs, 1)
    if n_queries is None:
        n_queries = n_pairs
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be true or false, got {replace!r}")
    n_queries = _count("n_queries", n_queries, 1)
    if not replace and n_queries > n_pairs:
        raise InputError(
            f"n_queries={n_queries} > n_pairs={n_pairs} asks some key twice: "
            "set replace=true (keys drawn with replacement) or fewer queries"
        )
    length = _count("length", length, 2 * (n_pairs + n_queries))
    vocab_size = _count("vocab_size", vocab_size, 2 * n_pairs + 2)
    rng = _rng(batch, seed)
    half = vocab_size // 2
    rows = np.arange(batch)[:, None]
    keys = rng.random((batch, half - 1)).argsort(axis=1)[:, :n_pairs] + 1
    values = rng.random((batch, vocab_size - half)).argsort(axis=1)[:, :n_pairs] + half
    ids = np.zeros((batch, length), dtype=np.int64)
    ids[:, 0 : 2 * n_pairs : 2] = keys
    ids[:, 1 : 2 * n_pairs : 2] = values
    # queries: n_queries non-overlapping (key, value) slots among the (length - 2n) // 2 slots
    slots = (length - 2 * n_pairs) // 2
    chosen = np.sort(rng.random((batch, slots)).argsort(axis=1)[:, :n_queries], axis=1)
    if replace:  # which pair each query asks
        order = rng.integers(0, n_pairs, size=(batch, n_queries))
    else:
        order = rng.random((batch, n_pairs)).argsort(axis=1)[:, :n_queries]
    query_at = 2 * n_pairs + 2 * chosen
    ids[rows, query_at] = keys[rows, order]
    ids[rows, query_at + 1] = values[rows, order]
    options = {"n_pairs": n_pairs, "n_queries": n_queries, "replace": replace}
    return _task("mqar", ids, query_at + 1, 2 * order + 1, seed, vocab_size, options)


_BUILDERS = {"induction": induction, "selective_copy": selective_copy, "mqar": mqar}


def make_memory_task(
    task: str, length: int, *, batch: int = 1, seed: int = 0, **options: object
) -> MemoryTask:
    """The memory task ``task`` (one of :data:`MEMORY_TASKS`) with ``options`` (vocab_size;
    induction: n_queries; selective_copy: n_data; mqar: n_pairs, n_queries, replace).
    ``InputError`` for an unknown task, ``TypeError`` for an option it does not take."""
    if task not in _BUILDERS:
        raise InputError(f"unknown memory task {task!r}; expected one of {MEMORY_TASKS}")
    try:
        return _BUILDERS[task](length, batch=batch, seed=seed, **options)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise TypeError(f"task {task!r} does not take option(s) {sorted(options)}") from None
        raise


def task_vocab_size(task: str, options: dict | None = None) -> int:
    """The vocabulary a model needs for ``task`` with ``options``."""
    return int((options or {}).get("vocab_size", DEFAULT_VOCAB[task]))


def answer_accuracy(logits: torch.Tensor, task: MemoryTask) -> torch.Tensor:
    """`(batch, n_answers)` bool: argmax of ``logits`` `(batch, length, vocab)` at each answer
    position's predecessor equals the answer."""
    at = (task.answer_positions - 1).to(logits.device)
    predicted = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
    return predicted.cpu() == task.answers


def _rng(batch: int, seed: int) -> np.random.Generator:
    _count("batch", batch, 1)
    return np.random.default_rng(_count("seed", seed, 0))


def _task(task, ids, answers, cues, seed, vocab_size, options) -> MemoryTask:
    return MemoryTask(
        input_ids=torch.from_numpy(np.array(ids, dtype=np.int64)),
        answer_positions=torch.from_numpy(np.array(answers, dtype=np.int64)),
        cue_positions=torch.from_numpy(np.array(cues, dtype=np.int64)),
        task=task,
        seed=seed,
        vocab_size=vocab_size,
        options={"vocab_size": vocab_size, **options},
    )
