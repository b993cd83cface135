"""Parquet manifests: versioned schemas, atomic writes, validated reads, and a resumable row writer.

Every file carries key-value metadata: ``vpotool.schema`` and ``vpotool.schema_version``, ``vpotool.version``
and ``vpotool.config`` (the resolved stage config as JSON). Paths stored in a manifest are relative to the
manifest's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vpotool import __version__
from vpotool.errors import VpoError, disk_space, not_a_file, one_line


@dataclass(frozen=True)
class Schema:
    """A manifest kind: required columns, the stage that writes it, and whether extra float columns may follow."""

    name: str
    version: int
    fields: tuple[pa.Field, ...]
    written_by: str
    extra_floats: bool = False
    key: tuple[str, ...] = ()
    extra_strings: tuple[str, ...] = ()  # optional text columns (a scores row's judge answer)

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]


def _f(name, type_):
    return pa.field(name, type_)


S, INT, F = pa.string(), pa.int64(), pa.float64()

SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in [
        Schema("prompts", 1, (_f("prompt_id", S), _f("prompt", S)), "you (or `vpotool eval`)", key=("prompt_id",)),
        Schema(
            "samples",
            1,
            (
                _f("sample_id", S), _f("prompt_id", S), _f("prompt", S), _f("candidate", INT), _f("seed", INT),
                _f("model", S), _f("model_path", S), _f("adapter", S), _f("steps", INT), _f("guidance", F),
                _f("noise_level", F), _f("frames", INT), _f("height", INT), _f("width", INT), _f("fps", INT),
                _f("video", S), _f("latent", S),
            ),
            "`vpotool sample`",
            key=("sample_id",),
        ),
        Schema(
            "scores",
            1,
            (_f("sample_id", S), _f("prompt_id", S), _f("reward", S), _f("overall", F)),
            "`vpotool score`",
            extra_floats=True,
            key=("sample_id", "reward"),
            extra_strings=("text",),
        ),
        Schema(
            "pairs",
            1,
            (
                _f("pair_id", S), _f("prompt_id", S), _f("prompt", S), _f("chosen_id", S), _f("rejected_id", S),
                _f("chosen_score", F), _f("rejected_score", F), _f("margin", F), _f("dimension", S), _f("source", S),
                _f("chosen_video", S), _f("rejected_video", S), _f("chosen_latent", S), _f("rejected_latent", S),
            ),
            "`vpotool pair`",
            key=("pair_id",),
        ),
        Schema(
            "labels",
            1,
            (
                _f("label_id", S), _f("prompt_id", S), _f("prompt", S), _f("left_id", S), _f("right_id", S),
                _f("choice", S), _f("labeler", S), _f("labelled_at", S), _f("left_video", S), _f("right_video", S),
            ),
            "`vpotool label`",
            key=("label_id",),
            extra_strings=("text", "note"),  # a judge's answer, and how its two orders agree
        ),
        Schema("metrics", 1, (_f("step", INT),), "the trainers and `vpotool loop`", extra_floats=True, key=("step",)),
        Schema(
            "eval",
            1,
            (_f("checkpoint", S), _f("metric", S), _f("mean", F), _f("std", F), _f("n", INT), _f("win_rate", F)),
            "`vpotool eval`",
            key=("checkpoint", "metric"),
        ),
    ]
}  # fmt: skip


def _arrow_schema(schema: Schema, extra: Iterable[str] = (), config: dict | None = None) -> pa.Schema:
    meta = {
        "vpotool.schema": schema.name,
        "vpotool.schema_version": str(schema.version),
        "vpotool.version": __version__,
        "vpotool.config": json.dumps(config or {}, sort_keys=True, default=str),
    }
    fields = list(schema.fields) + [pa.field(c, S if c in schema.extra_strings else F) for c in extra]
    return pa.schema(fields, metadata=meta)


def to_table(rows: list[dict], schema_name: str, config: dict | None = None) -> pa.Table:
    """Rows (dicts) -> a table with the manifest's schema; unknown keys become float columns where allowed."""
    schema = SCHEMAS[schema_name]
    known = set(schema.columns)
    extra = sorted({k for r in rows for k in r} - known)
    if not schema.extra_floats and set(extra) - set(schema.extra_strings):
        raise ValueError(f"{schema_name} manifest has no columns {extra}")
    missing = [c for c in schema.columns if rows and any(c not in r for r in rows)]
    if missing:
        raise ValueError(f"{schema_name} rows lack columns {missing}")
    arrow = _arrow_schema(schema, extra, config)
    cols = {f.name: [r.get(f.name) for r in rows] for f in arrow}
    return pa.Table.from_pydict(cols, schema=arrow)


CRASH_ENV = "VPOTOOL_CRASH_AT"
_crash_count = 0


def crash_point() -> int:
    """Mark a point where a kill would leave a half-done write (a temporary file not yet renamed, or a file renamed
    and the rest not yet done). Returns how many points this process has passed.

    For the crash-safety tests only: with ``VPOTOOL_CRASH_AT=N`` in the environment, the process SIGKILLs itself
    at its N-th point, as a power cut or an out-of-memory kill would stop it. Unset, this only counts.
    """
    global _crash_count
    _crash_count += 1
    if os.environ.get(CRASH_ENV, "") == str(_crash_count):
        os.kill(os.getpid(), signal.SIGKILL)
    return _crash_count


def crash_points() -> int:
    """How many :func:`crash_point` marks this process has passed (the crash-safety tests spread kills over them)."""
    return _crash_count


def temp_path(path: Path) -> Path:
    """The temporary name an atomic write of ``path`` goes through, ``.NAME.PID.tmp`` in the same folder: the
    name :func:`remove_stale_temps` deletes once its process is gone."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with disk_space(path):
            pq.write_table(table, tmp)
            crash_point()
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    crash_point()


def write_manifest(path: str | Path, rows: list[dict], schema_name: str, config: dict | None = None) -> None:
    """Validate ``rows`` against the named schema and write them atomically to ``path``."""
    write_table(to_table(rows, schema_name, config), path)


def manifest_kind(path: str | Path) -> str | None:
    """The schema name recorded in a Parquet file's metadata (None for foreign files). A file that is not
    readable Parquet (truncated, another format) is a VpoError naming it."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise VpoError(f"{path} is not a readable Parquet file ({one_line(e)}); regenerate it or leave it out") from e
    kind = meta.get(b"vpotool.schema")
    return kind.decode() if kind else None


def read_manifest(path: str | Path, schema_name: str, flag: str = "") -> pa.Table:
    """Read and check a manifest: it exists, parses, is of the expected kind and has the required columns.

    ``flag`` names the option the path came from, for the error message (e.g. ``--samples``).
    """
    schema = SCHEMAS[schema_name]
    path = Path(path)
    via = f" (given to {flag})" if flag else ""
    why = not_a_file(path)
    if why == "not found":
        raise VpoError(f"{schema_name} manifest not found: {path}{via}; it is written by {schema.written_by}")
    if why:
        raise VpoError(f"{path}{via} {why}; pass a {schema_name} manifest, written by {schema.written_by}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise VpoError(
            f"{path} is not a readable Parquet file ({one_line(e)}); regenerate it with {schema.written_by}"
        ) from e
    kind = (table.schema.metadata or {}).get(b"vpotool.schema", b"").decode() or None
    if kind and kind != schema_name:
        raise VpoError(
            f"{path} is a {kind} manifest, but a {schema_name} manifest is expected{via}; "
            f"{schema_name} manifests are written by {schema.written_by}"
        )
    missing = [c for c in schema.columns if c not in table.column_names]
    if missing:
        raise VpoError(
            f"{path} lacks column(s) {', '.join(missing)} of a {schema_name} manifest{via}; "
            f"{schema_name} manifests are written by {schema.written_by}"
        )
    version = int((table.schema.metadata or {}).get(b"vpotool.schema_version", b"1"))
    if version > schema.version:
        raise VpoError(f"{path} uses {schema_name} schema v{version}, newer than this vpotool reads; upgrade vpotool")
    return table


def manifest_config(table: pa.Table) -> dict:
    """The resolved config a manifest was written with."""
    raw = (table.schema.metadata or {}).get(b"vpotool.config")
    return json.loads(raw) if raw else {}


def resolve(manifest_path: str | Path, rel: str) -> Path:
    """A path stored in a manifest, made absolute against the manifest's folder."""
    p = Path(rel)
    return p if p.is_absolute() else Path(manifest_path).resolve().parent / p


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(\.\w+)?$")  # .NAME.PID.tmp[.ext], as writers name them


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | Path, outputs: tuple[str, ...] | None = None) -> int:
    """Delete the temporary files (``.NAME.PID.tmp[.ext]``) that a killed writer left in ``folder``; those of a live
    process stay. ``outputs``: only the temps of these file names (a stage sweeping its own outputs in a folder it
    shares). No output is ever read from such a file. Returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp*"):
        m = _TEMP.match(p.name)
        mine = m and (outputs is None or m["name"] in outputs)
        if mine and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _change(name: str, old, new) -> str:
    """``name 3 -> 5`` for short values, the bare name for long ones (a digest of prompts says nothing)."""
    shown = f"{name} {old!r} -> {new!r}"
    return shown if len(shown) <= 80 else name


def check_same_settings(path: str | Path, old: dict, new: dict, flag: str = "--out") -> None:
    """Refuse, in one line naming every differing setting, to add to ``path`` (written under settings ``old``)
    under settings ``new``. Settings only one side has are not compared."""
    differ = [_change(k, old[k], v) for k, v in new.items() if k in old and old[k] != v]
    if differ:
        raise VpoError(
            f"{path} was made with other settings ({'; '.join(differ)}); rerun with the same settings to resume, "
            f"or pass a new {flag}"
        )


def digest(value) -> str:
    """A short stable fingerprint of a JSON-able value (e.g. a prompt list), for resume checks."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class RowWriter:
    """Collects rows of one manifest and rewrites the file atomically at each ``flush``, so an interrupted stage
    keeps every row it flushed. Opening an existing file loads its rows for resuming: ``done`` holds their keys.

    ``config`` is stored in the metadata. ``compare`` holds the settings that change the rows (model, prompts,
    sampler settings, reward, ...); resuming a file whose recorded ones differ is refused in one line naming each
    differing setting, since mixing rows made under different settings would corrupt the manifest. Settings the
    file did not record are accepted and recorded from then on.
    """

    def __init__(self, path: str | Path, schema_name: str, config: dict, compare: dict | None = None):
        self.path = Path(path)
        self.schema = SCHEMAS[schema_name]
        self.rows: list[dict] = []
        remove_stale_temps(self.path.parent)
        old: dict = {}
        if self.path.exists():
            table = read_manifest(self.path, schema_name)
            old = manifest_config(table).get("_resume", {})
            check_same_settings(self.path, old, compare or {})
            self.rows = table.to_pylist()
        self.config = {**config, "_resume": {**old, **(compare or {})}}
        self.done = {self.key(r) for r in self.rows}

    def key(self, row: dict) -> tuple:
        return tuple(row[k] for k in self.schema.key)

    def add(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.rows.append(r)
            self.done.add(self.key(r))

    def flush(self) -> None:
        write_manifest(self.path, self.rows, self.schema.name, self.config)


PATH_COLUMNS = {
    "samples": ("video", "latent"),
    "pairs": ("chosen_video", "rejected_video", "chosen_latent", "rejected_latent"),
    "labels": ("left_video", "right_video"),
}


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links and relative paths); a missing path is no file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_merge_paths(inputs: list[str | Path], out: str | Path) -> None:
    """Refuse an input given twice (its rows would count once, hiding a missing shard) and an ``out`` that is one
    of the inputs (it would be overwritten while it is an input)."""
    for i, p in enumerate(inputs):
        twice = next((q for q in inputs[:i] if _same_file(p, q)), None)
        if twice is not None:
            raise VpoError(f"merge: {p} is given twice (also as {twice}); list each shard once")
        if _same_file(p, out):
            raise VpoError(f"merge: --out {out} is also an input; write the merged manifest to a new file")
    if Path(out).is_dir():
        raise VpoError(
            f"merge: --out {out} is a folder; pass a manifest file path, e.g. {Path(out) / 'samples.parquet'}"
        )


def check_merge_columns(table: pa.Table, path, schema: Schema, first: tuple | None) -> None:
    """Refuse, naming the input and the column, a manifest whose columns or column types differ from its schema's or
    from the first input's ``(path, pyarrow schema)``: shards of one job have the same columns, and rows of
    different columns cannot share one file."""
    wanted = {f.name: f.type for f in schema.fields}
    for f in table.schema:
        if f.name in wanted and f.type != wanted[f.name]:
            raise VpoError(f"merge: {path} has column {f.name} of type {f.type}, a {schema.name} manifest has "
                           f"{wanted[f.name]}; regenerate it with {schema.written_by}")  # fmt: skip
        text = f.name in schema.extra_strings and pa.types.is_string(f.type)
        if f.name not in wanted and not text and not (schema.extra_floats and pa.types.is_floating(f.type)):
            why = "a float" if schema.extra_floats else "no such"
            raise VpoError(f"merge: {path} has column {f.name} of type {f.type}, but a {schema.name} manifest has "
                           f"{why} column there; regenerate it with {schema.written_by}")  # fmt: skip
    if first is None:
        return
    (first_path, theirs), mine = first, table.schema
    for name in dict.fromkeys(theirs.names + mine.names):
        if name not in mine.names or name not in theirs.names:
            has, lacks = (first_path, path) if name in theirs.names else (path, first_path)
            raise VpoError(f"merge: {lacks} lacks column {name}, which {has} has; merge shards of one job "
                           "(the same stage and options)")  # fmt: skip
        if mine.field(name).type != theirs.field(name).type:
            raise VpoError(f"merge: {path} has column {name} of type {mine.field(name).type}, {first_path} of "
                           f"type {theirs.field(name).type}; merge shards of one job")  # fmt: skip


def merge_manifests(inputs: list[str | Path], out: str | Path) -> tuple[str, int]:
    """Combine manifests of one kind (e.g. shards) into ``out``: relative paths are rewritten against ``out``'s
    folder and rows are deduplicated by the schema's key (a key with different contents is an error).
    Returns ``(kind, rows written)``."""
    if not inputs:
        raise VpoError("merge needs at least one input manifest")
    check_merge_paths(inputs, out)
    for p in inputs:
        why = not_a_file(p)
        if why and why != "not found":
            raise VpoError(f"merge: {p} {why}; pass the manifests to combine")
    kinds = {str(p): manifest_kind(p) if Path(p).is_file() else None for p in inputs}
    for p, k in kinds.items():
        if k is None:
            raise VpoError(f"{p} is not a vpotool manifest (missing, or no vpotool metadata)")
    if len(set(kinds.values())) > 1:
        found = ", ".join(f"{Path(p).name}: {k}" for p, k in kinds.items())
        raise VpoError(f"merge takes manifests of one kind; got {found}")
    kind = next(iter(kinds.values()))
    schema = SCHEMAS[kind]
    out = Path(out)
    rows: dict[tuple, dict] = {}
    config = {}
    first = None
    for p in inputs:
        table = read_manifest(p, kind)
        check_merge_columns(table, p, schema, first)
        first = first or (p, table.schema)
        config = config or manifest_config(table)
        for r in table.to_pylist():
            for col in PATH_COLUMNS.get(kind, ()):
                if r[col]:  # empty means "none" (e.g. a pair without latents), not the manifest's folder
                    r[col] = os.path.relpath(resolve(p, r[col]), out.resolve().parent)
            key = tuple(r[k] for k in schema.key)
            if key in rows and rows[key] != r:
                raise VpoError(f"{p}: row {key} differs from the same row in another input; merge runs of one job")
            rows[key] = r
    config = {**config, "merged_from": [str(p) for p in inputs]}
    try:
        write_manifest(out, list(rows.values()), kind, config)
    except OSError as e:
        raise VpoError(f"merge: cannot write {out} ({one_line(e)}); pass a writable --out") from e
    return kind, len(rows)


SCORE_KEYS = ("sample_id", "prompt_id", "reward", "text")  # a scores row's columns that are not dimensions


def score_dimensions(row: dict) -> dict[str, float]:
    """A scores row's dimensions: its numeric columns that are set (not the ids, the reward's name or its text)."""
    return {k: v for k, v in row.items() if k not in SCORE_KEYS and isinstance(v, int | float) and v is not None}


def reward_rows(scores: list[dict], reward: str | None, dimension: str, path: Path, dimension_flag: str):
    """``(reward name, its rows)`` of a scores manifest: ``reward``, or the only one there; its rows must hold
    ``dimension``. Ambiguity and absence stop with one line naming ``--reward`` or ``dimension_flag``."""
    rewards = sorted({r["reward"] for r in scores})
    if not rewards:
        raise VpoError(f"{path} has no scores; run `vpotool score` first")
    name = reward or (rewards[0] if len(rewards) == 1 else None)
    if name is None:
        raise VpoError(f"{path} holds several rewards ({', '.join(rewards)}); choose one with --reward")
    if name not in rewards:
        raise VpoError(f"{path} has no scores of reward '{name}' (--reward); it has: {', '.join(rewards)}")
    rows = [r for r in scores if r["reward"] == name]
    dims = sorted(score_dimensions(rows[0]))
    if dimension not in dims:
        known = ", ".join(dims)
        raise VpoError(f"reward '{name}' has no dimension '{dimension}'; choose {dimension_flag} from: {known}")
    return name, rows
