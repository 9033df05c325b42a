"""The one exception type for bad input: what the user gave is wrong, not the code.

Validation code raises :class:`InputError` on purpose, with a message that says what was wrong
and what is accepted. The command line prints it as one line and exits with status 2; any other
exception is a bug and exits with status 1 ("internal error"), see :func:`fidelity.cli.main`.
It derives from ``ValueError`` so that API callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (an argument, a file's contents, a destination); the message says what is
    accepted."""


class MissingDependencyError(InputError, ImportError):
    """An optional package the requested feature needs is not installed; the message says
    how to install it (an :class:`InputError`: the command asked for something unavailable)."""
