"""Write a directory atomically: everything goes to a hidden sibling that is renamed into place.

A run that dies half way (an exception, Ctrl-C, SIGTERM) leaves no directory that looks
finished, and an existing directory is only replaced once its successor is complete. Every
staging directory holds a :data:`STAGING_MARKER` file naming the process that writes it, so a
staging directory left by a killed process (SIGKILL, power loss) is recognised as incomplete
(:func:`is_incomplete`) and deleted by the next save next to it (:func:`clean_stale_staging`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_MARKER = ".fidelity-staging"
"""File in a directory that is still being written: ``<pid> <host>`` of the writer."""
_STAGING_NAME = re.compile(r"^\..+\.(partial|old)-[0-9a-f-]+$")


def hidden_sibling(target: Path, tag: str) -> Path:
    """A fresh name next to ``target``: ``.<name>.<tag>-<pid>-<random>``."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid():x}-{uuid.uuid4().hex[:8]}")


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` at ``path`` (parents created), written to a hidden sibling and renamed into
    place: a reader sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(path, "partial")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def make_staging(target: Path) -> Path:
    """A new, empty-but-for-its-marker staging directory next to ``target``."""
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return staging


def is_incomplete(directory: Path) -> bool:
    """True for a staging directory or a directory whose writing was interrupted."""
    return bool(_STAGING_NAME.match(directory.name)) or (directory / STAGING_MARKER).exists()


def clean_stale_staging(target: Path) -> list[Path]:
    """Delete staging directories of ``target`` whose writer has died (same host only);
    returns them. Directories without a :data:`STAGING_MARKER` are never touched."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        if sibling.is_dir() and not sibling.is_symlink() and _writer_is_dead(sibling):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _writer_is_dead(staging: Path) -> bool:
    try:
        pid_text, host = (staging / STAGING_MARKER).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextmanager
def atomic_directory(target: Path, check_target: Callable[[Path], None]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``target`` by renaming.

    ``check_target(target)`` raises when ``target`` may not be written (it runs before and again
    after the writing). An existing ``target`` is moved aside, replaced, then deleted; if the
    final rename fails it is put back. On any exception (KeyboardInterrupt included) the
    staging directory is deleted and ``target`` is left as it was. The staging marker is
    excluded from what the caller sees and removed once ``target`` is in place.
    """
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = make_staging(target)
    try:
        yield staging
        check_target(target)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (target / STAGING_MARKER).unlink(missing_ok=True)


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
