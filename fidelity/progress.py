"""Progress reporting through a callback, so nothing below the CLI prints.

Long steps call ``progress.start(description, total)`` and then ``advance(done)`` on what it
returns. :class:`RichProgress` draws bars (the CLI, and notebooks with ``progress=True``);
:class:`SilentProgress` draws nothing.
"""

from __future__ import annotations

from typing import Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressTask(Protocol):
    def update(self, completed: float) -> None: ...


class ProgressReporter(Protocol):
    def start(self, description: str, total: float) -> ProgressTask: ...

    def close(self) -> None: ...


class _SilentTask:
    def update(self, completed: float) -> None:
        del completed


class SilentProgress:
    """Reports nothing."""

    def start(self, description: str, total: float) -> ProgressTask:
        del description, total
        return _SilentTask()

    def close(self) -> None:
        return None


class _RichTask:
    def __init__(self, progress: Progress, task_id) -> None:
        self._progress, self._task_id = progress, task_id

    def update(self, completed: float) -> None:
        self._progress.update(self._task_id, completed=completed)


class RichProgress:
    """Progress bars on stderr, one per step, drawn with rich."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._progress.start()

    def start(self, description: str, total: float) -> ProgressTask:
        return _RichTask(self._progress, self._progress.add_task(description, total=total))

    def close(self) -> None:
        self._progress.stop()


def as_reporter(progress: bool | ProgressReporter) -> ProgressReporter:
    """``True`` -> :class:`RichProgress`, ``False`` -> :class:`SilentProgress`, else as given."""
    if progress is True:
        return RichProgress()
    if progress is False or progress is None:
        return SilentProgress()
    return progress
