"""Tokenizers for probe inputs: byte-level by default, a local Hugging Face tokenizer when asked.

Every tokenizer here has the same small interface (:class:`Tokenizer`): ``name``,
``vocab_size``, ``encode(text) -> list[int]`` and ``decode(ids) -> str``. The byte-level
tokenizer needs no files and no network, handles any text, and matches the default vocabulary
(256) of the toolkit's models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fidelity.errors import InputError, MissingDependencyError

BYTE_VOCAB_SIZE = 256


@runtime_checkable
class Tokenizer(Protocol):
    """What probes need from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids ``ids``."""
        ...


def _as_int_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """``ids`` as a flat list of Python ints; accepts a sequence or a 1-D tensor / array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    values = list(ids)
    if any(isinstance(value, list) for value in values):
        raise InputError("decode takes a flat sequence of token ids, got a nested sequence")
    return values


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, one per byte; vocabulary size 256.

    ``encode`` never fails and ``decode(encode(text)) == text`` for every string; ``decode`` of
    an arbitrary id sequence (e.g. a cut through a multi-byte character) replaces invalid UTF-8
    with U+FFFD.
    """

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 256)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of byte ids ``ids`` (a sequence or 1-D tensor of ints in [0, 256))."""
        values = _as_int_list(ids)
        try:
            data = bytes(values)
        except (ValueError, TypeError) as err:
            raise InputError(
                f"byte token ids must be ints in [0, {BYTE_VOCAB_SIZE}); got {err}"
            ) from err
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HuggingFaceTokenizer:
    """A thin wrapper giving a Hugging Face tokenizer the :class:`Tokenizer` interface.

    ``encode`` adds no special tokens (probe prompts are built from pieces); ``vocab_size``
    is ``len(tokenizer)``, which counts added tokens; ``name`` is the directory it was loaded
    from, which also identifies it in per-process caches.
    """

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (special tokens kept, no clean-up of spaces)."""
        return self.hf_tokenizer.decode(
            _as_int_list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """``None`` -> :class:`ByteTokenizer`; a local Hugging Face tokenizer directory -> a wrapper.

    The directory is read with ``transformers.AutoTokenizer`` and ``local_files_only=True``
    (nothing is downloaded). Raises ``ImportError`` when transformers is not installed and
    ``ValueError`` when the path is not a directory or holds no loadable tokenizer.
    """
    if path is None:
        return ByteTokenizer()
    if not isinstance(path, (str, Path)):
        raise TypeError(f"tokenizer path must be a str, Path or None, got {type(path).__name__}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise InputError(
            f"tokenizer path {str(path)!r} is not a directory; expected None (byte-level "
            "tokenizer) or a local Hugging Face tokenizer directory"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise MissingDependencyError(
            "loading a Hugging Face tokenizer needs the 'transformers' package; install it "
            "with `pip install memory-fidelity[hf]`, or pass no tokenizer to use bytes"
        ) from err
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            f"could not load a Hugging Face tokenizer from {str(directory)!r}: {err}"
        ) from err
    return HuggingFaceTokenizer(hf_tokenizer, name=str(directory.resolve()))


def as_tokenizer(tokenizer: Tokenizer | str | Path | None) -> Tokenizer:
    """A tokenizer object as is; ``None`` or a directory path through :func:`load_tokenizer`."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"tokenizer must be None, a tokenizer directory path or an object with name, "
            f"vocab_size, encode and decode; got {type(tokenizer).__name__}"
        )
    return tokenizer
