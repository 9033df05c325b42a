"""Load the repository's scripts and benchmarks (not a package) as modules for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load(relative: str) -> ModuleType:
    """The file ``relative`` to the repository root (e.g. ``"benchmarks/claim_small.py"``),
    executed as a module named after it and registered in ``sys.modules`` (dataclasses look
    their module up there)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
