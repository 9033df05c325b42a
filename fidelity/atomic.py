"""Write a directory atomically: everything goes to a hidden sibling that is renamed into place.

A run that dies half way (an exception, Ctrl-C) leaves no directory that looks finished, and an
existing directory is only replaced once its successor is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def hidden_sibling(target: Path, tag: str) -> Path:
    """A fresh name next to ``target``: ``.<name>.<tag>-<random>``."""
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_directory(target: Path, check_target: Callable[[Path], None]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``target`` by renaming.

    ``check_target(target)`` raises when ``target`` may not be written (it runs before and again
    after the writing). An existing ``target`` is moved aside, replaced, then deleted; if the
    final rename fails it is put back. On any exception (KeyboardInterrupt included) the
    staging directory is deleted and ``target`` is left as it was.
    """
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        check_target(target)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    backup = hidden_sibling(target, "old")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    if backup.exists():
        logger.warning("could not delete the replaced directory at %s", backup)
