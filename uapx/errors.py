"""The one error type uapx raises for problems a user can fix.

A :class:`UapxError` carries what went wrong and how to fix it.  The CLI turns it into a single
line on stderr and a non-zero exit code (:data:`EXIT_USAGE`); anything else that escapes is a bug
and keeps its traceback.
"""
from __future__ import annotations

EXIT_USAGE = 2  # bad input the user can fix (the error names the fix)
EXIT_PLUGIN = 3  # a plugin raised while running
EXIT_INTERRUPTED = 130


class UapxError(Exception):
    """A problem the user can fix.

    Args:
        message: what went wrong, one sentence.
        fix: what to do about it, one sentence (optional).
        exit_code: the process exit code the CLI uses for this error.
    """

    def __init__(self, message: str, fix: str | None = None, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        line = self.message.rstrip(".")
        if self.fix:
            line += f"; fix: {self.fix.rstrip('.')}"
        return " ".join(line.split())  # always one line


class SplitNotFound(UapxError):
    """A data set has no such split where it was looked for (e.g. no training split beside the
    embedded MNIST test split): ``analyze`` then draws its held-out images from the one split."""
