"""The one exception type users see: a problem with their input, stated with its fix."""


class VpoError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits non-zero.

    Messages name the problem and what to do about it, e.g.
    ``prompts file not found: prompts.txt (pass --prompts with a .txt or .parquet file)``.
    """
