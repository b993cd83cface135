"""Helpers the stages share: output checks and locks, per-video seeds and shards."""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from pathlib import Path

from vpotool.config import parse_shard
from vpotool.errors import VpoError, one_line


def output_folder(folder: str | Path, flag: str = "--out") -> Path:
    """Create ``folder`` if needed and check that this process can write in it (by writing a probe file: a
    permission check would pass for root on a read-only folder it can write anyway). Raises VpoError with one
    line when ``folder`` is a file, cannot be created or is not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VpoError(f"{flag} {folder} is an existing file, not a folder; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VpoError(
            f"cannot create the folder {folder} ({one_line(e.strerror or e)}); pass a writable {flag}"
        ) from e
    probe = folder / f".write-check.{os.getpid()}.tmp"  # a writer's temp name: a killed run's probe is cleaned up
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = one_line(e.strerror or e)
        raise VpoError(f"cannot write in {folder} ({why}); make it writable or pass another {flag}") from e
    return folder


def output_file(path: str | Path, flag: str = "--out", suffix: str = ".parquet") -> Path:
    """Check an output manifest path: it ends in ``suffix``, is not a folder, and its folder is writable."""
    path = Path(path)
    if path.suffix != suffix:
        raise VpoError(f"{flag} {path} should be a {suffix} file path, e.g. RUN/{path.stem or 'out'}{suffix}")
    if path.is_dir():
        raise VpoError(f"{flag} {path} is an existing folder; pass a file path such as {path / ('out' + suffix)}")
    output_folder(path.parent, flag)
    return path


def writer_lock(output: str | Path, flag: str = "--out"):
    """The lock of ``output`` (see ``vpotool.locks``) as a context manager, so one process writes it at a time. Under
    ``accelerate launch`` or ``torchrun`` only the main process (RANK 0) locks: the others write nothing there."""
    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    from vpotool.locks import acquire_output_lock

    return acquire_output_lock(output, flag)


def shard_slice(items: list, shard: str) -> list:
    """The i-th of n interleaved slices of ``items`` for ``--shard i/n``."""
    i, n = parse_shard(shard)
    return items[i::n]


def shard_suffix(shard: str) -> str:
    """``""`` for the whole job, else ``-00002-of-00004`` to keep shard files apart."""
    i, n = parse_shard(shard)
    return "" if n == 1 else f"-{i:05d}-of-{n:05d}"


def video_seed(base_seed: int, prompt_id: str, candidate: int) -> int:
    """A stable per-video seed from the base seed, prompt id and candidate index (independent of batching,
    sharding and resume order)."""
    h = hashlib.blake2b(f"{base_seed}/{prompt_id}/{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**31 - 1)
