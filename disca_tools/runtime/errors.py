"""The one error type for user mistakes.

Core code raises :class:`UserError` with a message that names the file and the problem; only the CLI
layer turns it into a single line on stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or options (bad file, inconsistent options, ...)."""


class JobAborted(Exception):
    """Raised when a RELION External job is asked to stop (RELION_JOB_ABORT_NOW)."""


def file_error(path: str | Path, problem: str) -> UserError:
    """Build a UserError whose message starts with the file name: ``path: problem``."""
    return UserError(f"{path}: {problem}")


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path, raising a UserError if it does not exist or is not a file."""
    p = Path(path)
    if not p.exists():
        raise file_error(p, f"{what} not found")
    if not p.is_file():
        raise file_error(p, f"{what} is not a regular file")
    return p
