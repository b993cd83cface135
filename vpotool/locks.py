"""One writer per output: a lock file next to an output (a manifest or a run folder) that a second process
writing the same output is refused by, with one line naming the holder and the way out.

The lock is an ``flock(2)`` on ``.<name>.lock`` beside the output, and the file holds the holder's PID for the
message. The kernel drops an flock when its process ends, however it ends (Ctrl-C, SIGKILL, a crash), so a lock
file left behind by a dead process is taken over at once, and a PID reused by an unrelated process cannot keep
it held. Locks are advisory and local: every vpotool writer takes one, other programs and other machines (NFS
without lock support) are not stopped.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vpotool.errors import VpoError


def lock_path(output: str | Path) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` in the same folder (a sibling also for a run folder)."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """A held output lock; ``release()`` (or leaving its ``with`` block) removes the file and frees it."""

    def __init__(self, output: Path, path: Path, fd: int):
        self.output, self.path, self._fd = output, path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock; a second call does nothing."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):  # still ours: remove it while held
                self.path.unlink()
        except OSError:  # already gone, or the folder went away: nothing left to clean
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The PID written in an open lock file, as text ("unknown" if it holds none yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def acquire_output_lock(output: str | Path, flag: str = "--out") -> OutputLock:
    """Take the lock of ``output`` now, for this process, and return it (use it as ``with acquire_output_lock(p):``
    or keep it and call ``release()``). ``flag`` names the option ``output`` came from, for the message.

    Raises VpoError (one line: the output, the holder's PID, what to do) while another process, or another
    ``acquire_output_lock`` of this process, holds it. Creates the folder of ``output`` if needed.
    """
    output = Path(output)
    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VpoError(f"cannot create the folder of {output} ({e}); pass a writable {flag}") from e
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise VpoError(f"cannot create the lock file {path} ({e}); pass a writable {flag}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            holder = _holder(fd)
            os.close(fd)
            raise VpoError(
                f"{output} is being written by another vpotool process (PID {holder}, lock {path.name}); "
                f"wait for it or stop it, or pass another {flag}"
            ) from None
        except OSError as e:  # e.g. a network file system without locks
            os.close(fd)
            raise VpoError(f"cannot lock {path} ({e}); pass a {flag} on a local disk") from e
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released (and removed) the file between our open and flock: try the new one
    os.ftruncate(fd, 0)  # a dead holder's PID may be there
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return OutputLock(output, path, fd)
