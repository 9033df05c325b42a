"""The default corpus's file list: folders pruned while walking give the list of the plain
recursive glob that filtered afterwards (kept here as the reference)."""

import os
import sysconfig
from pathlib import Path

import pytest

from fidelity.probes.corpus import (
    STDLIB_EXCLUDED_FOLDERS,
    STDLIB_EXCLUDED_PREFIX,
    _stdlib_files,
)


def _reference(root: Path) -> list[tuple[str, Path]]:
    """The former listing: every ``*.py`` under ``root``, filtered after the walk."""
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if any(part in STDLIB_EXCLUDED_FOLDERS for part in relative.parts[:-1]):
            continue
        if path.name.startswith(STDLIB_EXCLUDED_PREFIX) or not path.is_file():
            continue
        found.append((relative.as_posix(), path))
    return sorted(found)


def test_scratch_tree_lists_what_the_glob_listed(tmp_path):
    files = [
        "a.py",
        "b.txt",
        ".hidden.py",
        "pkg/__init__.py",
        "pkg/deep/x.py",
        "pkg/test/skipped.py",
        "pkg/tests/skipped.py",
        "site-packages/lib/skipped.py",
        "encodings/cp1252.py",
        "idlelib/idle_test/skipped.py",
        "_sysconfigdata_linux.py",
        "pkg/_sysconfigdata_x.py",
        "testing/kept.py",
        "folder.py/inner.py",
    ]
    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    (tmp_path / "linked_file.py").symlink_to(tmp_path / "a.py")
    (tmp_path / "linked_folder").symlink_to(tmp_path / "pkg", target_is_directory=True)
    (tmp_path / "broken.py").symlink_to(tmp_path / "missing.py")
    listed = _stdlib_files(tmp_path)
    assert listed == _reference(tmp_path)
    names = [name for name, _ in listed]
    assert "pkg/deep/x.py" in names and "testing/kept.py" in names and "linked_file.py" in names
    assert not any("skipped" in name or "linked_folder" in name for name in names)


@pytest.mark.skipif(not os.path.isdir(sysconfig.get_paths()["stdlib"]), reason="no stdlib")
def test_standard_library_lists_what_the_glob_listed():
    root = Path(sysconfig.get_paths()["stdlib"])
    listed = _stdlib_files()
    assert listed == _reference(root)
    assert len(listed) > 100
