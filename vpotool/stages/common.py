"""Helpers the stages share: prompts files, output checks and locks, per-video seeds, shards, progress bars."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from vpotool.config import parse_shard
from vpotool.errors import VpoError, one_line


def load_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt_id, prompt)`` pairs from a .txt file (one prompt a line; blank lines and ``#`` lines skipped;
    ids ``p00000``, ``p00001``, ... by line order among prompts), a prompts .parquet (``prompt`` column, with
    ``prompt_id`` if present), or ``world:train`` / ``world:heldout`` / ``world:all``: the tiny world's prompts."""
    if path.startswith("world:"):
        from vpotool.world import world_prompts

        return [(w.id, w.text) for w in world_prompts(path.removeprefix("world:"))]
    p = Path(path)
    if not p.is_file():
        raise VpoError(f"prompts file not found: {path} (pass --prompts with a .txt or .parquet file, or world:train)")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 (any read failure is the same user problem)
            raise VpoError(f"{path} is not a readable Parquet file ({e})") from e
        if "prompt" not in table.column_names:
            raise VpoError(f"{path} has no 'prompt' column; a prompts manifest needs prompt (and prompt_id)")
        texts = [str(t) for t in table.column("prompt").to_pylist()]
        ids = (
            [str(i) for i in table.column("prompt_id").to_pylist()]
            if "prompt_id" in table.column_names
            else [f"p{i:05d}" for i in range(len(texts))]
        )
        if len(set(ids)) != len(ids):
            raise VpoError(f"{path} has duplicate prompt_id values; each prompt needs its own id")
        rows = list(zip(ids, texts, strict=True))
    else:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise VpoError(f"{path} is not UTF-8 text; give a .txt with one prompt a line, or a .parquet") from e
        texts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        rows = [(f"p{i:05d}", t) for i, t in enumerate(texts)]
    rows = [(i, t) for i, t in rows if t.strip()]
    if not rows:
        raise VpoError(f"no prompts in {path}; write one prompt per line")
    return rows


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


@contextmanager
def progress_bar(description: str, total: int):
    """A rich progress bar on stderr; yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def console():
    """The rich console for status lines (stderr, so stdout stays for results such as written paths)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def sparkline(values: list[float]) -> str:
    """``values`` as a row of block characters scaled between their min and max, e.g. ``▁▃▄▆█``."""
    blocks = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(blocks[round((v - lo) / span * (len(blocks) - 1))] for v in values)
