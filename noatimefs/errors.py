"""User-facing errors and the exit codes documented in README.rst."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Exit codes of the ``noatimefs`` command (README.rst, "Exit codes")."""

    OK = 0
    INTERNAL = 1  # a bug or an unexpected failure; the log has the traceback
    USAGE = 2  # bad command line (argparse)
    SOURCE = 3  # SOURCE missing, not a directory, unreadable
    MOUNTPOINT = 4  # MOUNTPOINT missing, not a directory, not empty, mounted, dead, inside SOURCE
    OWNER = 5  # unknown user or uid
    FUSE = 6  # no /dev/fuse, no fusermount3, kernel too old, the mount itself failed


class QuietError(Exception):
    """An error the user can fix: printed as one line, no traceback (after s3ql)."""

    def __init__(self, message: str, exitcode: Exit) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode
