"""Parse human-friendly sequence lengths: ``"60k"`` -> 60000, ``"1.5k"`` -> 1500, ``"2M"``."""

from __future__ import annotations

import re

from fidelity.errors import InputError

ACCEPTED_FORMS = (
    "a positive whole number of tokens, optionally with a k (thousand) or M (million) suffix, "
    "e.g. 512, 8k, 1.5k, 60k, 400000, 2M"
)

_LENGTH_PATTERN = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<suffix>[kKmM]?)$")
_MULTIPLIERS = {"": 1, "k": 1_000, "m": 1_000_000}


def parse_length(text: str | int) -> int:
    """Return the number of tokens that ``text`` names.

    Accepts an ``int`` (returned as is when positive) or a string such as ``"60k"``,
    ``"1.5k"``, ``"400000"`` or ``"2M"``; suffixes are case-insensitive (``k`` = 1000,
    ``M`` = 1,000,000). Raises ``ValueError`` naming the accepted forms for anything else,
    including zero, negative numbers and fractional token counts (``"1.2345k"``).
    """
    if isinstance(text, bool):
        raise TypeError(f"length must be a string or int, got bool; expected {ACCEPTED_FORMS}")
    if isinstance(text, int):
        if text <= 0:
            raise InputError(f"length must be positive, got {text}; expected {ACCEPTED_FORMS}")
        return text
    if not isinstance(text, str):
        raise TypeError(
            f"length must be a string or int, got {type(text).__name__}; expected {ACCEPTED_FORMS}"
        )
    match = _LENGTH_PATTERN.match(text.strip())
    if match is None:
        raise InputError(f"invalid length {text!r}: expected {ACCEPTED_FORMS}")
    number, suffix = match["number"], match["suffix"].lower()
    multiplier = _MULTIPLIERS[suffix]
    whole, _, fraction = number.partition(".")
    numerator = int(whole + fraction) * multiplier
    denominator = 10 ** len(fraction)
    if numerator % denominator:
        raise InputError(f"invalid length {text!r}: not a whole number of tokens")
    tokens = numerator // denominator
    if tokens <= 0:
        raise InputError(f"invalid length {text!r}: must be positive; expected {ACCEPTED_FORMS}")
    return tokens


def format_length(tokens: int) -> str:
    """A short label for ``tokens``: 60000 -> ``"60k"``, 1500 -> ``"1.5k"``, 512 -> ``"512"``."""
    for suffix, multiplier in (("M", 1_000_000), ("k", 1_000)):
        if tokens >= multiplier and (tokens * 10) % multiplier == 0:
            value = tokens / multiplier
            return f"{value:g}{suffix}"
    return str(tokens)
