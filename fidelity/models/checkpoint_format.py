"""What every checkpoint format shares: the file names, what a format contributes to loading
(:class:`Source`) and the helpers importers build it with.

:mod:`fidelity.models.checkpoint` reads our format and :mod:`fidelity.models.importers` the
foreign ones; both import this module, and neither imports the other's internals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fidelity.errors import InputError
from fidelity.models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Source:
    """What a checkpoint format contributes: our config, how its weight names map onto ours
    (``None``: a name to ignore), where its weights are and what to record as provenance."""

    config: ModelConfig
    rename: Callable[[str], str | None]
    weight_files: tuple[str, ...]
    provenance: dict[str, Any]


def renamer(rules: list[tuple[str, str]], ignored: str | None = None) -> Callable[[str], str]:
    """Map a source weight name with the first matching ``(pattern, replacement)``; names
    matching ``ignored`` map to None; unmatched names are kept (and then reported)."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    ignored_pattern = re.compile(ignored) if ignored else None

    def rename(name: str) -> str | None:
        if ignored_pattern is not None and ignored_pattern.search(name):
            return None
        for pattern, replacement in compiled:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    return rename


def require_keys(header: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Refuse a ``config.json`` ``header`` that lacks any of ``keys`` (``what``: its format)."""
    missing = [key for key in keys if key not in header]
    if missing:
        raise InputError(f"{what} config.json lacks {missing}")
