"""Prompt lists every stage reads: a .txt file, a prompts manifest, or the tiny world's splits."""

from __future__ import annotations

from pathlib import Path

from vpotool.errors import VpoError


def load_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt_id, prompt)`` pairs from a .txt file (one prompt a line; blank lines and ``#`` lines skipped;
    ids ``p00000``, ``p00001``, ... by line order among prompts), a prompts .parquet (``prompt`` column, with
    ``prompt_id`` if present), or a tiny-world split: ``world:train``, ``world:heldout``, ``world:align``,
    ``world:val`` or ``world:all``."""
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
