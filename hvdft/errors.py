"""User-facing errors: one line, the cause, the file and line where there is one."""

from __future__ import annotations

from pathlib import Path


class HvdftError(Exception):
    """A problem with the user's input or setup. Printed as one line, no traceback."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 *, everywhere: bool = False):
        """`everywhere`: every rank raises this same error (it was decided from data all ranks
        share), so rank 0 alone prints it. `dist.agree` sets it for errors it spreads."""
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.agreed = everywhere


class Interrupted(Exception):
    """The job was asked to stop (SIGTERM/SIGINT); a checkpoint has been written."""


# Exit statuses, documented in the README's "Failure behaviour" section.
EXIT_USER_ERROR = 2
EXIT_CRASH = 1
EXIT_INTERRUPTED = 130
