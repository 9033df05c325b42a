"""Where the toolkit writes: destinations checked before the work, and only its own files
replaced.

Every directory the toolkit writes (an analysis result, a comparison, a training run) holds a
manifest, :data:`MANIFEST` ::

    {"library": "memory-fidelity", "kind": "result", "files": ["meta.json", ...]}

listing the files it wrote there (paths relative to the directory). ``force`` replaces or
deletes only those files, and only in a directory whose manifest has the same ``kind``; a
directory with other content is refused whatever the options. A user's own files next to the
toolkit's are kept. Directories written before manifests existed are recognised by a
:class:`Legacy` rule (their required files), and then only files with the toolkit's names
count as its own.

A destination is checked (:func:`check_destination`) before any work starts: not an input of
the same command, not a file, not someone else's directory, writable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fidelity.atomic import STAGING_MARKER, clean_stale_staging, is_incomplete, make_staging
from fidelity.errors import InputError

MANIFEST = "fidelity-manifest.json"
LIBRARY = "memory-fidelity"
KIND_NAMES = {
    "result": "result directory",
    "comparison": "comparison directory",
    "training": "training run directory",
    "series": "checkpoint series directory",
}
"""Kinds of directory the toolkit writes, and how messages name them."""


@dataclass(frozen=True)
class Legacy:
    """A directory of some kind written before manifests: it holds every ``required`` file,
    and its files named in ``names`` are the toolkit's."""

    required: tuple[str, ...]
    names: frozenset[str]


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, or None when absent or not a valid manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("library") != LIBRARY:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return manifest


def owned_files(directory: Path, kind: str, legacy: Legacy | None = None) -> list[str] | None:
    """Files (relative paths) the toolkit wrote in ``directory`` as a ``kind`` directory, the
    manifest included; None when it is not such a directory. Paths that would leave the
    directory (``..``, absolute, through a symbolic link) are never listed."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is not None:
        if manifest.get("kind") != kind:
            return None
        return [f for f in manifest["files"] if _inside(directory, f)] + [MANIFEST]
    if legacy is not None and all((directory / name).is_file() for name in legacy.required):
        return sorted(p.name for p in directory.iterdir() if p.name in legacy.names and p.is_file())
    return None


def _inside(directory: Path, relative: str) -> bool:
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    root = directory.resolve()
    parent = (directory / path).parent.resolve()
    return parent == root or root in parent.parents


def check_destination(
    target: str | os.PathLike[str],
    *,
    kind: str,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    legacy: Legacy | None = None,
) -> None:
    """Raise unless ``kind`` output may be written to ``target`` (before any work starts).

    FileExistsError: ``target`` is a file, or a non-empty directory without ``force``, or (even
    with ``force``) one that is not a ``kind`` directory the toolkit wrote. InputError:
    ``target`` is, contains or lies in one of ``inputs``, is an interrupted save, or cannot be
    written (permissions).
    """
    target = Path(target)
    label = KIND_NAMES[kind]
    for source in inputs:
        if _overlaps(target, Path(source)):
            raise InputError(
                f"{target} is also an input of this command ({source}); refusing to write over "
                "it: choose another destination"
            )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} exists and is not a {label}; choose another destination")
    if target.is_dir() and is_incomplete(target):
        raise InputError(f"{target} is a staging directory of an unfinished save; choose another")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise FileExistsError(
                f"{target} already exists; pass force=True (CLI: --force) to replace the files "
                "fidelity wrote there"
            )
        if owned_files(target, kind, legacy) is None:
            raise FileExistsError(
                f"{target} is not empty and is not a {label} written by fidelity (no {MANIFEST} "
                f"of kind {kind!r}); refusing to replace it even with force=True: choose another "
                "destination"
            )
    check_writable(target)


def check_writable(target: Path) -> None:
    """InputError unless ``target`` (a directory, existing or not) and its parent can be
    written: a staging directory is made next to it."""
    target = Path(target)
    for path in (target, target.parent):
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"cannot create {target}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {target}: {existing} is not writable (permission)")


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


@contextmanager
def owned_directory(
    target: str | os.PathLike[str],
    *,
    kind: str,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    legacy: Legacy | None = None,
) -> Iterator[Path]:
    """Yield an empty staging directory; once the block ends, its files become ``target``'s.

    A new ``target`` appears by one rename. An existing one (allowed by
    :func:`check_destination`) gets the new files moved in one by one while it carries the
    staging marker (so it reads as incomplete until done), then loses the files of its old
    manifest that the new one lacks; the user's own files are left alone. On any exception
    (KeyboardInterrupt included) before that, the staging directory is deleted and ``target``
    is untouched.
    """
    target = Path(target)
    inputs = list(inputs)
    check_destination(target, kind=kind, force=force, inputs=inputs, legacy=legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = make_staging(target)
    try:
        yield staging
        files = sorted(
            p.relative_to(staging).as_posix()
            for p in staging.rglob("*")
            if p.is_file() and p.name not in (STAGING_MARKER, MANIFEST)
        )
        _write_manifest(staging, kind, files)
        check_destination(target, kind=kind, force=force, inputs=inputs, legacy=legacy)
        if target.is_dir() and any(target.iterdir()):
            _merge(staging, target, files, owned_files(target, kind, legacy) or [])
        else:
            if target.is_dir():
                target.rmdir()
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (target / STAGING_MARKER).unlink(missing_ok=True)


def _write_manifest(directory: Path, kind: str, files: list[str]) -> None:
    manifest = {"library": LIBRARY, "kind": kind, "files": sorted(set(files))}
    temporary = directory / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    temporary.replace(directory / MANIFEST)


def _merge(staging: Path, target: Path, files: list[str], old: list[str]) -> None:
    """Move ``files`` from ``staging`` into ``target``, replacing only the ``old`` owned files."""
    foreign = [f for f in files if (target / f).exists() and f not in old]
    if foreign:
        raise FileExistsError(
            f"{target} holds {foreign[0]}, which fidelity did not write there; refusing to "
            "overwrite it: move it away or choose another destination"
        )
    (target / STAGING_MARKER).write_text((staging / STAGING_MARKER).read_text())
    for name in files:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, destination)
    for name in old:
        if name not in files and name != MANIFEST:
            remove_owned(target, name)
    os.replace(staging / MANIFEST, target / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)


def remove_owned(directory: Path, relative: str) -> None:
    """Delete one owned file, then its parent folders inside ``directory`` left empty."""
    if not _inside(directory, relative):
        return
    path = directory / relative
    if path.is_file() or path.is_symlink():
        path.unlink()
    parent = path.parent
    root = directory.resolve()
    while parent.resolve() != root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def record_files(directory: Path, kind: str, files: Iterable[str]) -> None:
    """Add ``files`` to the manifest of ``directory`` (created when absent), atomically."""
    manifest = read_manifest(directory)
    known = list(manifest["files"]) if manifest is not None else []
    _write_manifest(directory, kind, [*known, *files])


def clear_owned(directory: Path, kind: str) -> None:
    """Delete every file the manifest of ``directory`` lists (a ``kind`` directory), then the
    manifest; the user's own files stay."""
    files = owned_files(directory, kind)
    if files is None:
        raise FileExistsError(f"{directory} is not a {KIND_NAMES[kind]} written by fidelity")
    for name in files:
        if name != MANIFEST:
            remove_owned(directory, name)
    (directory / MANIFEST).unlink(missing_ok=True)
