"""One exception type for every bad input the user can fix.

Entry points catch :class:`BadInputError` and print its message without a traceback,
so every message must name the offending file or value and say what to do.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """Raised for user-fixable input problems; the message names the input."""

    def __init__(self, what: str, problem: str, hint: str = "") -> None:
        self.what = what
        self.problem = problem
        self.hint = hint
        msg = f"{what}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self) -> tuple:
        """Keep the three parts when pickled (Ray and multiprocessing ship errors between processes)."""
        return (type(self), (self.what, self.problem, self.hint))
