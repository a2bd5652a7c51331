"""Error messages of one line: torch and timm raise exceptions whose text runs to pages."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, else the name of its type."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
