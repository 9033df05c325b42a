"""Text corpora for probes and training: files -> one byte array, split by file (train / heldout).

A corpus is a sequence of documents concatenated into one ``uint8`` array (each document
followed by a blank line), with the start offset and name of every document. Documents are
whole files (``.txt``, ``.md``, any explicitly named file) or the records of ``.jsonl`` files.

Splits: every file is assigned to "train" or "heldout" by a hash of its path relative to the
directory it was found in (a file named directly: its file name), so the assignment does not
depend on the machine or on where the directory lives, and train and heldout text never
overlap. About :data:`HELDOUT_FRACTION` of the files are held out; "all" takes every file.
Without a split, the default corpus is read held out and the user's files whole: text a user
names is the user's data. A user's file that is empty or not UTF-8 text (binary) is an error.

The default corpus, used when no paths are given, is the Python standard library's own ``.py``
sources (``sysconfig.get_paths()["stdlib"]``), which exist on every Python installation: all
``.py`` files in sorted order, except those under ``site-packages``, test folders (``test``,
``tests``, ``idle_test``), ``encodings`` (generated code-page tables) and the machine-specific
``_sysconfigdata*`` modules. On CPython 3.11 that is about 11 MB (one byte-level token per
byte): about 8.6 MB train and 2.1 MB held out.

Corpora are cached per process (:func:`clear_corpus_cache` empties the cache), as are their
token streams under non-byte tokenizers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fidelity.errors import InputError
from fidelity.probes.tokenizer import ByteTokenizer, Tokenizer

SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.2
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
DOCUMENT_SEPARATOR = b"\n\n"
STDLIB_EXCLUDED_FOLDERS = ("site-packages", "test", "tests", "idle_test", "encodings")
STDLIB_EXCLUDED_PREFIX = "_sysconfigdata"


@dataclass(frozen=True, eq=False)
class Corpus:
    """Documents concatenated into one token stream.

    ``ids`` `(n_tokens,)`: bytes (``uint8``) for the byte tokenizer, token ids (``int64``)
    otherwise; ``doc_starts`` `(n_docs,)` int64: where each document starts in ``ids``
    (ascending, the first is 0); ``doc_names``: one name per document (a path relative to
    its root, ``name.jsonl:LINE`` for jsonl records); ``description`` says what the corpus is
    in words; ``key`` identifies it in caches.
    """

    ids: np.ndarray
    doc_starts: np.ndarray
    doc_names: tuple[str, ...]
    description: str
    key: tuple

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def window_sources(self, start: int, end: int) -> tuple[tuple[str, ...], int]:
        """Names of the documents that tokens ``[start, end)`` touch, and ``start``'s offset
        in the first of them (in tokens)."""
        if not 0 <= start < end <= len(self):
            raise ValueError(f"window [{start}, {end}) is not inside the corpus [0, {len(self)})")
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.doc_starts, end - 1, side="right")) - 1
        return self.doc_names[first : last + 1], start - int(self.doc_starts[first])


def assign_split(relative_name: str) -> str:
    """``"heldout"`` for about :data:`HELDOUT_FRACTION` of names, else ``"train"``; a fixed
    function of the name (SHA-1), the same on every machine and Python version."""
    digest = hashlib.sha1(relative_name.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if position < HELDOUT_FRACTION else "train"


def _stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative name, path) of the default corpus's files under ``root`` (default: the
    standard library), sorted by name.

    Excluded folders are not entered (``site-packages`` alone can hold far more files than
    the standard library); symlinked folders are not followed."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_EXCLUDED_FOLDERS]
        for name in names:
            if not name.endswith(".py") or name.startswith(STDLIB_EXCLUDED_PREFIX):
                continue
            path = Path(folder, name)
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _user_files(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """(relative name, path) of the files under ``paths``: a named file as is, directories
    searched recursively for :data:`TEXT_SUFFIXES` (hidden files and folders skipped)."""
    found: dict[Path, str] = {}
    for root in paths:
        if root.is_file():
            found.setdefault(root.resolve(), root.name)
            continue
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            hidden = any(part.startswith(".") for part in relative.parts)
            if path.suffix.lower() in TEXT_SUFFIXES and path.is_file() and not hidden:
                found.setdefault(path.resolve(), relative.as_posix())
    return sorted((name, path) for path, name in found.items())


def _jsonl_documents(path: Path, name: str, text_field: str) -> list[tuple[str, bytes]]:
    """One document per non-empty ``text_field`` of the records of a jsonl file."""
    documents = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_number} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or text_field not in record:
                raise InputError(
                    f"{path}:{line_number} has no field {text_field!r}; every jsonl record "
                    "needs one (choose the field with --text-field, or text_field=... in Python)"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise InputError(
                    f"{path}:{line_number}: field {text_field!r} must be a string, "
                    f"got {type(text).__name__}"
                )
            if text.strip():
                documents.append((f"{name}:{line_number}", text.encode("utf-8")))
    return documents


def _read_documents(
    files: Sequence[tuple[str, Path]], text_field: str, named: Collection[Path] | None
) -> list[tuple[str, bytes]]:
    """(name, bytes) of every non-empty document in ``files``; unreadable files are skipped
    with a warning. ``named``: the user's files named directly (``None`` for the default
    corpus): every user file must be UTF-8 text, and a named file must not be blank
    (``InputError``); blank files found in a directory are skipped."""
    documents = []
    for name, path in files:
        try:
            if path.suffix.lower() == ".jsonl":
                found = _jsonl_documents(path, name, text_field)
                if named is not None and path in named and not found:
                    raise InputError(f"text file {path} holds no record with text")
                documents.extend(found)
                continue
            data = path.read_bytes()
        except OSError as err:
            warnings.warn(f"skipping unreadable text file {path}: {err}", stacklevel=3)
            continue
        if named is not None:
            _check_text(path, data, blank_allowed=path not in named)
        if data.strip():
            documents.append((name, data))
    return documents


def _check_text(path: Path, data: bytes, blank_allowed: bool) -> None:
    """Raise ``InputError`` unless ``data`` (the contents of ``path``) is UTF-8 text, and
    non-blank unless ``blank_allowed``."""
    if not data.strip() and not blank_allowed:
        raise InputError(f"text file {path} is empty")
    reason = None
    nul = data.find(b"\x00")
    if nul >= 0:
        reason = f"a NUL byte at offset {nul}"
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"byte {err.start} is not UTF-8"
    if reason is not None:
        raise InputError(
            f"text file {path} looks binary ({reason}); text must be UTF-8 (.txt, .md, .jsonl)"
        )


def _build(documents: Sequence[tuple[str, bytes]], description: str, key: tuple) -> Corpus:
    """Concatenate ``documents`` (each followed by :data:`DOCUMENT_SEPARATOR`)."""
    sizes = np.array([len(data) + len(DOCUMENT_SEPARATOR) for _, data in documents])
    starts = np.zeros(len(documents), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    joined = DOCUMENT_SEPARATOR.join(data for _, data in documents) + DOCUMENT_SEPARATOR
    ids = np.frombuffer(joined, dtype=np.uint8)  # (n_bytes,), read-only view of `joined`
    names = tuple(name for name, _ in documents)
    return Corpus(ids=ids, doc_starts=starts, doc_names=names, description=description, key=key)


@functools.lru_cache(maxsize=16)
def _load_cached(resolved_paths: tuple[str, ...] | None, split: str, text_field: str) -> Corpus:
    if resolved_paths is None:
        files = _stdlib_files()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = f"the Python {version} standard library's .py sources"
    else:
        files = _user_files([Path(path) for path in resolved_paths])
        source = ", ".join(resolved_paths)
    if not files:
        raise InputError(
            f"no text files under {source}: directories are searched recursively for "
            f"{', '.join(TEXT_SUFFIXES)} files"
        )
    chosen = [item for item in files if split == "all" or assign_split(item[0]) == split]
    if not chosen:
        raise InputError(
            f"none of the {len(files)} text file(s) under {source} falls in the {split!r} split "
            f"(files are assigned by a hash of their relative path, about "
            f"{HELDOUT_FRACTION:.0%} held out); pass split='all' to use every file"
        )
    named = None
    if resolved_paths is not None:
        named = {Path(path) for path in resolved_paths if Path(path).is_file()}
    documents = _read_documents(chosen, text_field, named)
    if not documents:
        raise InputError(
            f"the corpus is empty: the {len(chosen)} file(s) of the {split!r} split under "
            f"{source} are unreadable or hold no text"
        )
    key = (resolved_paths, split, text_field)
    return _build(documents, f"{source} ({split} split)", key)


def load_corpus(
    paths: str | Path | Sequence[str | Path] | None = None,
    *,
    split: str | None = None,
    text_field: str = "text",
) -> Corpus:
    """The byte corpus of the files under ``paths`` (default corpus when ``None``).

    ``paths``: files or directories (``.txt``, ``.md``, ``.jsonl`` found recursively in
    directories; a directly named file is read whatever its suffix, as jsonl if it ends in
    ``.jsonl``); ``split``: one of :data:`SPLITS`, or ``None`` for "heldout" of the default
    corpus and "all" of ``paths``; ``text_field``: the jsonl field holding the text. Cached
    per process. Raises ``ValueError`` for a missing path, an unknown split, an empty
    corpus, and a file of ``paths`` that is empty or not UTF-8 text.
    """
    if split is None:
        split = "heldout" if paths is None else "all"
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(text_field, str) or not text_field:
        raise TypeError(f"text_field must be a non-empty string, got {text_field!r}")
    if paths is None:
        return _load_cached(None, split, text_field)
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputError("paths is empty; give files or directories, or None for the default")
    resolved = []
    for path in paths:
        if not isinstance(path, (str, Path)):
            raise TypeError(f"text paths must be str or Path, got {type(path).__name__}")
        if not Path(path).expanduser().exists():
            raise InputError(f"text path does not exist: {str(path)!r}")
        resolved.append(str(Path(path).expanduser().resolve()))
    return _load_cached(tuple(resolved), split, text_field)


_TOKENIZED: dict[tuple, Corpus] = {}


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer) -> Corpus:
    """``corpus`` in ``tokenizer``'s token space (the byte corpus itself for bytes).

    Each document is encoded on its own (so document starts stay exact); the result is
    cached per process by corpus and tokenizer name.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return corpus
    cache_key = (corpus.key, tokenizer.name)
    if cache_key not in _TOKENIZED:
        ends = [*corpus.doc_starts[1:].tolist(), len(corpus)]
        pieces = [
            np.asarray(
                tokenizer.encode(corpus.ids[start:end].tobytes().decode("utf-8", "replace")),
                dtype=np.int64,
            )
            for start, end in zip(corpus.doc_starts.tolist(), ends, strict=True)
        ]
        sizes = np.array([piece.shape[0] for piece in pieces], dtype=np.int64)
        starts = np.zeros(len(pieces), dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        _TOKENIZED[cache_key] = Corpus(
            ids=np.concatenate(pieces),
            doc_starts=starts,
            doc_names=corpus.doc_names,
            description=f"{corpus.description}, tokenized by {tokenizer.name}",
            key=cache_key,
        )
    return _TOKENIZED[cache_key]


def clear_corpus_cache() -> None:
    """Forget every cached corpus and token stream (e.g. after files changed on disk)."""
    _load_cached.cache_clear()
    _TOKENIZED.clear()
