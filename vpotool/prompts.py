"""Prompt lists every stage reads: a .txt file, a prompts manifest, or the tiny world's splits."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from vpotool.errors import VpoError, not_a_file


def load_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt_id, prompt)`` pairs from a .txt file (one prompt a line; blank lines and ``#`` lines skipped;
    ids ``p00000``, ``p00001``, ... by line order among prompts), a prompts .parquet (``prompt`` column, with
    ``prompt_id`` if present), or a tiny-world split: ``world:train``, ``world:heldout``, ``world:align``,
    ``world:val`` or ``world:all``."""
    if path.startswith("world:"):
        from vpotool.world import world_prompts

        return [(w.id, w.text) for w in world_prompts(path.removeprefix("world:"))]
    p = Path(path)
    why = not_a_file(p)
    fix = "pass --prompts with a .txt or .parquet file, or world:train"
    if why == "not found":
        raise VpoError(f"prompts file not found: {path} ({fix})")
    if why:
        raise VpoError(f"prompts file {path} {why} ({fix})")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 (any read failure is the same user problem)
            raise VpoError(f"{path} is not a readable Parquet file ({e})") from e
        if "prompt" not in table.column_names:
            raise VpoError(f"{path} has no 'prompt' column; a prompts manifest needs prompt (and prompt_id)")
        texts = table.column("prompt").to_pylist()
        ids = (
            table.column("prompt_id").to_pylist()
            if "prompt_id" in table.column_names
            else [f"p{i:05d}" for i in range(len(texts))]
        )
        for row, (i, t) in enumerate(zip(ids, texts, strict=True)):
            for column, value in (("prompt_id", i), ("prompt", t)):
                if value is None:  # str(None) made the prompt "None"
                    raise VpoError(f"{path} row {row}: {column} is null; fill it in or drop the row")
            check_text(str(t), f"{path} row {row} (prompt_id {i})")
        ids, texts = [str(i) for i in ids], [str(t) for t in texts]
        if len(set(ids)) != len(ids):
            raise VpoError(f"{path} has duplicate prompt_id values; each prompt needs its own id")
        rows = list(zip(ids, texts, strict=True))
    else:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise VpoError(f"{path} is not UTF-8 text; give a .txt with one prompt a line, or a .parquet") from e
        numbered = [(n, ln.strip()) for n, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]
        for n, t in numbered:
            check_text(t, f"{path} line {n}")
        rows = [(f"p{i:05d}", t) for i, (_, t) in enumerate(numbered)]
    rows = [(i, t) for i, t in rows if t.strip()]
    if not rows:
        raise VpoError(f"no prompts in {path}; write one prompt per line")
    return rows


def check_text(text: str, where: str) -> None:
    """Refuse a prompt holding control characters (NUL bytes, escapes, ...; tabs and line breaks pass): no text
    encoder reads them as words, and they reach manifests, logs and the report as garbage. ``where`` names the
    row."""
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if bad is not None:
        raise VpoError(f"{where}: the prompt holds the control character {bad!r}; write it as plain text")
