"""vpotool.manifest: schema round trips with metadata, atomic writes, one-line read errors, resumable writers and
shard merging with path rewriting."""

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vpotool import __version__
from vpotool.errors import VpoError
from vpotool.manifest import (
    SCHEMAS,
    RowWriter,
    manifest_config,
    manifest_kind,
    merge_manifests,
    read_manifest,
    resolve,
    write_manifest,
)

VALUES = {pa.string(): "x", pa.int64(): 3, pa.float64(): 0.5}


def row(schema_name: str, **over) -> dict:
    """A minimal valid row of the named schema (plus one extra float column where the schema allows them)."""
    schema = SCHEMAS[schema_name]
    r = {f.name: VALUES[f.type] for f in schema.fields}
    if schema.extra_floats:
        r["flicker"] = 0.25
    return {**r, **over}


def sample_row(sid: str, **over) -> dict:
    paths = {"video": f"videos/{sid}.mp4", "latent": f"latents/{sid}.st"}
    return row("samples", sample_id=sid, prompt_id="p0", **{**paths, **over})


def score_row(sid: str, reward: str = "temporal", **over) -> dict:
    return row("scores", sample_id=sid, prompt_id="p0", reward=reward, overall=0.5, **over)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_round_trip_with_metadata(tmp_path, name):
    rows = [row(name), row(name)]
    for i, r in enumerate(rows):  # distinct keys
        for k in SCHEMAS[name].key:
            r[k] = i if isinstance(r[k], int) else f"{r[k]}{i}"
    config = {"seed": 1, "out": "run", "nested": {"a": [1, 2]}}
    path = tmp_path / f"{name}.parquet"
    write_manifest(path, rows, name, config)

    table = read_manifest(path, name)
    assert table.to_pylist() == rows
    assert table.column_names[: len(SCHEMAS[name].columns)] == SCHEMAS[name].columns
    for f in SCHEMAS[name].fields:
        assert table.schema.field(f.name).type == f.type
    meta = table.schema.metadata
    assert meta[b"vpotool.schema"] == name.encode()
    assert meta[b"vpotool.schema_version"] == str(SCHEMAS[name].version).encode()
    assert meta[b"vpotool.version"] == __version__.encode()
    assert json.loads(meta[b"vpotool.config"]) == config
    assert manifest_config(table) == config
    assert manifest_kind(path) == name

    df = pd.read_parquet(path)
    assert len(df) == 2 and list(df.columns) == table.column_names


def test_extra_float_columns_only_where_allowed(tmp_path):
    path = tmp_path / "scores.parquet"
    a, b = score_row("a", flicker=0.1), score_row("b", smooth=0.9)
    del b["flicker"]
    write_manifest(path, [a, b], "scores")
    table = read_manifest(path, "scores")
    assert table.schema.field("flicker").type == pa.float64()
    assert table.column("flicker").to_pylist() == [0.1, None]  # a row without the column reads as null
    assert table.column("smooth").to_pylist() == [None, 0.9]
    with pytest.raises(ValueError, match="bogus"):
        write_manifest(tmp_path / "s.parquet", [sample_row("a", bogus=1.0)], "samples")


def test_empty_manifest_round_trips(tmp_path):
    write_manifest(tmp_path / "p.parquet", [], "pairs")
    table = read_manifest(tmp_path / "p.parquet", "pairs")
    assert table.num_rows == 0 and table.column_names == SCHEMAS["pairs"].columns


# ---------------------------------------------------------------- atomic writes


def test_write_leaves_no_temp_files(tmp_path):
    write_manifest(tmp_path / "run" / "samples.parquet", [sample_row("a")], "samples")
    assert files_in(tmp_path / "run") == ["samples.parquet"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "samples.parquet"
    write_manifest(path, [sample_row("a")], "samples")
    before = path.read_bytes()
    bad = sample_row("b")
    del bad["seed"]
    with pytest.raises(ValueError, match="seed"):
        write_manifest(path, [sample_row("c"), bad], "samples")
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["samples.parquet"]


def _interrupted_write(table, where, **kw):
    Path(where).write_bytes(b"PAR1 half a file")
    raise OSError("disk full")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "samples.parquet"
    write_manifest(path, [sample_row("a")], "samples")
    before = path.read_bytes()
    monkeypatch.setattr(pq, "write_table", _interrupted_write)
    with pytest.raises(OSError):
        write_manifest(path, [sample_row("b")], "samples")
    assert path.read_bytes() == before


def test_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "samples.parquet"
    monkeypatch.setattr(pq, "write_table", _interrupted_write)
    with pytest.raises(OSError):
        write_manifest(path, [sample_row("b")], "samples")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- read errors


def test_missing_file_names_the_writing_stage(tmp_path):
    with pytest.raises(VpoError) as e:
        read_manifest(tmp_path / "samples.parquet", "samples", flag="--samples")
    msg = one_line_error(e)
    assert "not found" in msg and "samples.parquet" in msg
    assert "--samples" in msg and "vpotool sample" in msg


@pytest.mark.parametrize("content", [b"not a parquet file", b""], ids=["junk", "empty"])
def test_non_parquet_file(tmp_path, content):
    path = tmp_path / "scores.parquet"
    path.write_bytes(content)
    with pytest.raises(VpoError) as e:
        read_manifest(path, "scores")
    msg = one_line_error(e)
    assert str(path) in msg and "Parquet" in msg and "vpotool score" in msg


def test_wrong_kind_says_what_it_is(tmp_path):
    path = tmp_path / "samples.parquet"
    write_manifest(path, [sample_row("a")], "samples")
    with pytest.raises(VpoError) as e:
        read_manifest(path, "scores", flag="--scores")
    msg = one_line_error(e)
    assert "is a samples manifest" in msg and "scores manifest is expected" in msg
    assert "--scores" in msg and "vpotool score" in msg


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "overall": [1.0]}), path)  # no vpotool metadata
    with pytest.raises(VpoError) as e:
        read_manifest(path, "scores")
    msg = one_line_error(e)
    assert "prompt_id, reward" in msg
    assert "overall" not in msg.split("lacks")[1].split("of a")[0]
    assert "vpotool score" in msg


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_manifest(path, [row("pairs")], "pairs")
    table = pq.read_table(path)
    meta = {**table.schema.metadata, b"vpotool.schema_version": b"2"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(VpoError, match="upgrade vpotool") as e:
        read_manifest(path, "pairs")
    one_line_error(e)


# ---------------------------------------------------------------- RowWriter


def test_row_writer_resumes(tmp_path):
    path = tmp_path / "scores.parquet"
    w = RowWriter(path, "scores", {"batch_size": 8}, compare={"reward": "temporal"})
    assert w.done == set() and not path.exists()
    w.add([score_row("a"), score_row("b")])
    assert w.done == {("a", "temporal"), ("b", "temporal")}
    w.flush()

    w2 = RowWriter(path, "scores", {"batch_size": 4}, compare={"reward": "temporal"})
    assert w2.done == {("a", "temporal"), ("b", "temporal")}
    w2.add([score_row("c")])
    w2.flush()
    table = read_manifest(path, "scores")
    assert table.column("sample_id").to_pylist() == ["a", "b", "c"]
    config = manifest_config(table)
    assert config["batch_size"] == 4 and config["_resume"] == {"reward": "temporal"}
    assert files_in(tmp_path) == ["scores.parquet"]


def test_row_writer_refuses_other_settings(tmp_path):
    path = tmp_path / "samples.parquet"
    w = RowWriter(path, "samples", {}, compare={"steps": 30, "seed": 0})
    w.add([sample_row("a")])
    w.flush()
    with pytest.raises(VpoError) as e:
        RowWriter(path, "samples", {}, compare={"steps": 20, "seed": 1})
    msg = one_line_error(e)
    assert "steps 30 -> 20" in msg and "seed 0 -> 1" in msg and "new --out" in msg
    # Same settings (and settings the old file did not record) resume; the new ones are recorded from then on.
    w = RowWriter(path, "samples", {}, compare={"steps": 30, "seed": 0, "new": 1})
    assert w.done == {("a",)}
    w.flush()
    assert manifest_config(read_manifest(path, "samples"))["_resume"] == {"steps": 30, "seed": 0, "new": 1}
    with pytest.raises(VpoError, match="new 1 -> 2"):
        RowWriter(path, "samples", {}, compare={"new": 2})
    # A long value (a digest, a reward's options) is named, not printed.
    w = RowWriter(tmp_path / "s.parquet", "samples", {}, compare={"prompts": "x" * 60})
    w.flush()
    with pytest.raises(VpoError, match=r"settings \(prompts\)"):
        RowWriter(tmp_path / "s.parquet", "samples", {}, compare={"prompts": "y" * 60})


def test_row_writer_checks_the_existing_file(tmp_path):
    path = tmp_path / "scores.parquet"
    write_manifest(path, [sample_row("a")], "samples")
    with pytest.raises(VpoError, match="is a samples manifest"):
        RowWriter(path, "scores", {})


# ---------------------------------------------------------------- resolve


def test_resolve(tmp_path, monkeypatch):
    manifest = tmp_path / "run" / "samples.parquet"
    assert resolve(manifest, "videos/a.mp4") == (tmp_path / "run").resolve() / "videos" / "a.mp4"
    absolute = (tmp_path / "elsewhere" / "b.mp4").resolve()
    assert resolve(manifest, str(absolute)) == absolute
    monkeypatch.chdir(tmp_path)
    assert resolve("run/samples.parquet", "videos/a.mp4") == tmp_path.resolve() / "run" / "videos" / "a.mp4"
    assert resolve("samples.parquet", "../x/a.mp4") == tmp_path.resolve() / ".." / "x" / "a.mp4"


# ---------------------------------------------------------------- merge_manifests


def test_merge_rewrites_paths_against_the_output(tmp_path):
    a, b = tmp_path / "shard0" / "samples.parquet", tmp_path / "shard1" / "samples.parquet"
    write_manifest(a, [sample_row("s0"), sample_row("s1")], "samples", {"seed": 0})
    absolute = str((tmp_path / "store" / "s2.mp4").resolve())
    write_manifest(b, [sample_row("s2", video=absolute)], "samples", {"seed": 0})
    out = tmp_path / "merged" / "samples.parquet"

    assert merge_manifests([a, b], out) == ("samples", 3)
    rows = {r["sample_id"]: r for r in read_manifest(out, "samples").to_pylist()}
    assert rows["s0"]["video"] == os.path.join("..", "shard0", "videos", "s0.mp4")
    assert rows["s1"]["latent"] == os.path.join("..", "shard0", "latents", "s1.st")
    assert rows["s2"]["latent"] == os.path.join("..", "shard1", "latents", "s2.st")
    assert resolve(out, rows["s0"]["video"]).resolve() == resolve(a, "videos/s0.mp4")
    assert resolve(out, rows["s2"]["video"]).resolve() == Path(absolute)
    config = manifest_config(read_manifest(out, "samples"))
    assert config["seed"] == 0 and config["merged_from"] == [str(a), str(b)]


def test_merge_dedupes_identical_rows(tmp_path):
    a, b = tmp_path / "run" / "samples.0.parquet", tmp_path / "run" / "samples.1.parquet"
    write_manifest(a, [sample_row("s0"), sample_row("s1")], "samples")
    write_manifest(b, [sample_row("s1"), sample_row("s2")], "samples")
    out = tmp_path / "run" / "samples.parquet"
    assert merge_manifests([a, b], out) == ("samples", 3)
    rows = read_manifest(out, "samples").to_pylist()
    assert [r["sample_id"] for r in rows] == ["s0", "s1", "s2"]
    assert rows[1]["video"] == os.path.join("videos", "s1.mp4")


def test_merge_rejects_conflicting_duplicates(tmp_path):
    a, b = tmp_path / "run" / "samples.0.parquet", tmp_path / "run" / "samples.1.parquet"
    write_manifest(a, [sample_row("s1", seed=1)], "samples")
    write_manifest(b, [sample_row("s1", seed=2)], "samples")
    out = tmp_path / "run" / "samples.parquet"
    with pytest.raises(VpoError, match="differs") as e:
        merge_manifests([a, b], out)
    one_line_error(e)
    assert not out.exists()


def test_merge_rejects_mixed_kinds_and_foreign_files(tmp_path):
    a, b = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    write_manifest(a, [sample_row("s1")], "samples")
    write_manifest(b, [score_row("s1")], "scores")
    with pytest.raises(VpoError, match="one kind") as e:
        merge_manifests([a, b], tmp_path / "out.parquet")
    msg = one_line_error(e)
    assert "samples.parquet: samples" in msg and "scores.parquet: scores" in msg
    with pytest.raises(VpoError, match="not a vpotool manifest"):
        merge_manifests([a, tmp_path / "missing.parquet"], tmp_path / "out.parquet")
    with pytest.raises(VpoError, match="at least one"):
        merge_manifests([], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_stale_temp_files_of_a_dead_writer_are_removed_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from vpotool.manifest import RowWriter, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    stale = [tmp_path / f".scores.parquet.{pid}.tmp", tmp_path / f".p00000-c00.mp4.{pid}.tmp.mp4"]
    live = tmp_path / f".scores.parquet.{os.getppid()}.tmp"  # our parent is alive
    other = tmp_path / ".notes.tmp"  # not a writer's temp name
    for p in [*stale, live, other]:
        p.write_bytes(b"half written")
    assert remove_stale_temps(tmp_path) == 2
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    live.unlink()
    (tmp_path / f".scores.parquet.{pid}.tmp").write_bytes(b"x")
    RowWriter(tmp_path / "scores.parquet", "scores", {})  # a rerun of the stage cleans up on opening
    assert not (tmp_path / f".scores.parquet.{pid}.tmp").exists()


def test_a_judges_answers_are_kept_beside_its_scores_and_read_as_no_dimension(tmp_path):
    """A reward that keeps its answers (``last_texts``, as videoscore2 does) gets them in a ``text`` column of the
    scores manifest; readers of dimensions (pair, eval, report) skip it, and merge accepts it."""
    import torch

    from vpotool.manifest import merge_manifests, read_manifest, reward_rows, write_manifest
    from vpotool.stages.score import score_rows

    class Judge:
        name, differentiable, dimensions, score_range = "judge", False, ("quality", "overall"), (1.0, 5.0)

        def __call__(self, frames, prompts):
            self.last_texts = [f"answer {i}: looks fine" for i in range(len(prompts))]
            q = torch.arange(len(prompts), dtype=torch.float32) + 1
            return {"quality": q, "overall": q}

    rows = [{"sample_id": f"s{i}", "prompt_id": "p0", "prompt": "a cat", "fps": 8, "video": "v.mp4"} for i in range(2)]
    out = score_rows({"judge": Judge()}, torch.rand(2, 2, 3, 4, 4), rows)
    assert [r["text"] for r in out] == ["answer 0: looks fine", "answer 1: looks fine"]
    write_manifest(tmp_path / "a.parquet", out, "scores")
    table = read_manifest(tmp_path / "a.parquet", "scores")
    assert table.schema.field("text").type == "string"
    name, got = reward_rows(table.to_pylist(), None, "quality", tmp_path / "a.parquet", "--dimension")
    assert name == "judge" and [r["quality"] for r in got] == [1.0, 2.0]
    with pytest.raises(VpoError, match="no dimension 'text'"):
        reward_rows(table.to_pylist(), None, "text", tmp_path / "a.parquet", "--dimension")
    write_manifest(tmp_path / "b.parquet", [{**r, "sample_id": r["sample_id"] + "b"} for r in out], "scores")
    merge_manifests([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet", "scores").num_rows == 4


def test_stale_temps_of_named_outputs_only(tmp_path):
    """A rerun sweeps the temps its own outputs' dead writers left (eval killed while writing prompts.parquet), and
    leaves other files' temps and those of live writers alone."""
    import os
    import subprocess

    from vpotool.manifest import remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine, other = tmp_path / f".prompts.parquet.{dead.pid}.tmp", tmp_path / f".notes.parquet.{dead.pid}.tmp"
    live = tmp_path / f".prompts.parquet.{os.getppid()}.tmp"
    for p in (mine, other, live):
        p.write_bytes(b"half")
    assert remove_stale_temps(tmp_path, ("prompts.parquet", "eval.parquet")) == 1
    assert not mine.exists() and other.exists() and live.exists()
