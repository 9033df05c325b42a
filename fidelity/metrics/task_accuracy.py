"""Accuracy on the synthetic memory tasks (induction, selective copy, MQAR), at any length.

A row counts as solved when the argmax of the logits predicts every answer of the row (the
answers are teacher-forced in the row, :mod:`fidelity.probes.memory_tasks`; for induction's
single final answer this is greedy decoding). Rows run through the model's recurrent cache in
chunks of ``chunk_size`` tokens, so memory does not grow with the length for the recurrent
models (a Transformer's KV cache does grow: one key and one value per token and layer). Only
the logits at the answers' predecessors are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fidelity.errors import InputError
from fidelity.metrics.retrieval import wilson_interval
from fidelity.models.base import AUTO_CHUNK_SIZE, CausalLM
from fidelity.probes.memory_tasks import MemoryTask, make_memory_task


@dataclass(frozen=True)
class TaskAccuracy:
    """Solved rows out of ``trials`` at ``length`` with a Wilson 95% interval, and the
    fraction of single answers predicted correctly (``answer_accuracy``)."""

    task: str
    length: int
    solved: int
    trials: int
    low: float
    high: float
    answer_accuracy: float

    @property
    def accuracy(self) -> float:
        return self.solved / self.trials


@torch.no_grad()
def answer_hits(
    model: CausalLM, task: MemoryTask, chunk_size: int | None = AUTO_CHUNK_SIZE
) -> torch.Tensor:
    """`(batch, n_answers)` bool: the model's argmax at each answer's predecessor equals the
    answer. ``chunk_size=None`` runs one parallel forward (no cache)."""
    ids = task.input_ids.to(model.device)
    wanted = task.answer_positions - 1  # (batch, n_answers) positions whose logits we need
    predicted = torch.full(wanted.shape, -1, dtype=torch.long)
    length = ids.shape[1]
    step = length if chunk_size is None else chunk_size
    cache = None if chunk_size is None else model.init_cache(ids.shape[0])
    for start in range(0, length, step):
        end = min(start + step, length)
        logits = model(ids[:, start:end], cache=cache).logits.cpu()  # (batch, chunk, vocab)
        inside = (wanted >= start) & (wanted < end)
        if inside.any():
            rows, columns = inside.nonzero(as_tuple=True)
            predicted[rows, columns] = logits[rows, wanted[rows, columns] - start].argmax(-1)
    return predicted == task.answers


def task_accuracy(
    model: CausalLM,
    task: str,
    length: int,
    *,
    trials: int = 100,
    batch: int = 16,
    seed: int = 0,
    chunk_size: int | None = AUTO_CHUNK_SIZE,
    **options: object,
) -> TaskAccuracy:
    """Accuracy of ``model`` on ``trials`` rows of ``task`` at ``length`` (rows drawn in
    batches of ``batch``, batch ``i`` from seed ``seed + i``)."""
    if trials < 1 or batch < 1:
        raise InputError(f"trials and batch must be positive, got {trials}, {batch}")
    solved, answers, correct = 0, 0, 0
    for index, start in enumerate(range(0, trials, batch)):
        rows = min(batch, trials - start)
        built = make_memory_task(task, length, batch=rows, seed=seed + index, **options)
        hits = answer_hits(model, built, chunk_size)
        solved += int(hits.all(dim=1).sum())
        answers += hits.numel()
        correct += int(hits.sum())
    low, high = wilson_interval(solved, trials)
    return TaskAccuracy(task, length, solved, trials, low, high, correct / answers)
