"""Short labels for token counts, shared by figures, reports and result labels (no matplotlib:
a result's label is made where nothing is drawn)."""

from __future__ import annotations

import math


def format_token_count(count: float) -> str:
    """Short, exact label for a token count: 60000 -> "60k", 1500 -> "1.5k", 4096 -> "4096"."""
    if not math.isfinite(count):
        return "–"
    if count != int(count):
        return f"{count:g}"
    number = int(count)
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if abs(number) >= unit and number % (unit // 10) == 0:
            return f"{number / unit:g}{suffix}"
    return str(number)
