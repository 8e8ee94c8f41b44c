"""The one error type for bad Meta-IO data, so callers can tell bad input from a bug.

Every message names where the problem is: the file (or the writer call), the stripe and the
column, whichever apply, followed by what is wrong and, where there is one, how to fix it.
"""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad data or a bad dataset layout. ``file``, ``stripe`` and ``column`` locate it."""

    def __init__(self, detail: str, file: Optional[str] = None, stripe: Optional[int] = None,
                 column: Optional[str] = None):
        self.detail = detail
        self.file = file
        self.stripe = stripe
        self.column = column
        super().__init__(format_location(file, stripe, column) + detail)

    def __reduce__(self):  # keep the location fields across pickling (worker processes)
        return (DataError, (self.detail, self.file, self.stripe, self.column))


def format_location(file: Optional[str], stripe: Optional[int], column: Optional[str]) -> str:
    """``"FILE: stripe S: column 'C': "`` with only the parts that are known."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if stripe is not None:
        parts.append(f"stripe {stripe}")
    if column is not None:
        parts.append(f"column {column!r}")
    return "".join(p + ": " for p in parts)
