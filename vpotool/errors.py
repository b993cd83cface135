"""The one exception type users see: a problem with their input, stated with its fix."""

import errno
from contextlib import contextmanager


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(text) -> str:
    """``text`` (or an exception's message) with newlines and other control characters as single spaces, so an
    error quoting a library's message (pyarrow puts control bytes in some) stays one line."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def not_a_file(path) -> str | None:
    """Why ``path`` cannot be read as an input file, as the end of a sentence about it: ``"not found"``, ``"is a
    folder, not a file"`` or ``"is not a regular file (a device, pipe or socket)"`` (``/dev/zero`` would be read
    forever); None for a regular file (through links)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a dangling link, a path through a file, a NUL byte
        return "not found"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return "is not a regular file (a device, pipe or socket)"


class VpoError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits non-zero.

    Messages name the problem and what to do about it, e.g.
    ``prompts file not found: prompts.txt (pass --prompts with a .txt or .parquet file)``.
    """


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on device; disk quota exceeded


@contextmanager
def disk_space(path, flag: str = "--out"):
    """Turn a full disk (or quota) while writing ``path`` into one line naming the file, so a stage stops with its
    finished rows saved instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise VpoError(f"no space left on device writing {path}; free space or pass another {flag}") from e
