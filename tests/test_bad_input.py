"""Bad input stops up front in one line naming the problem and the fix (exit status 2, no traceback), and leaves
what is already there as it was: config files, prompt files, manifests, adapters, disk space, absurd sizes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAST

from vpotool.errors import VpoError


def refused(result, *words) -> str:
    """Assert a run stopped with exit status 2 and one stderr line holding ``words``; returns that line."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- config files


def test_yaml_aliases_are_refused_in_one_line(cli, tmp_path):
    """Nested aliases (a "billion laughs" file) expanded to gigabytes of error message; aliases are refused."""
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\nprompts: *g\nout: run\n")
    line = refused(cli("sample", "--config", path), "laughs.yaml", "YAML alias *a", "line 2")
    assert len(line) < 300
    plain = tmp_path / "plain.yaml"
    plain.write_text("prompts: &p p.txt\nout: run\n")  # an anchor alone changes nothing
    refused(cli("sample", "--config", plain, *FAST), "prompts file not found: p.txt")


# ---------------------------------------------------------------- a folder or a device where a file belongs


def test_a_folder_or_device_given_as_an_input_file_says_what_it_is(cli, tmp_path):
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    for what in (folder, "/dev/zero"):
        why = "is a folder, not a file" if what == folder else "is not a regular file"
        refused(cli("sample", "--prompts", what, "--out", tmp_path / "run", *FAST), f"prompts file {what} {why}")
        refused(cli("sample", "--config", what), f"config file {what} {why}")
        refused(cli("score", "--samples", what, "--out", tmp_path / "s.parquet"), f"{what} (given to --samples) {why}")
        args = ("pair", "--samples", what, "--scores", what, "--out", tmp_path / "p.parquet")
        refused(cli(*args), why, "samples manifest")
        refused(cli("train-dpo", "--pairs", what, "--out", tmp_path / "t", "--device", "cpu"), "--pairs", why)
        refused(cli("merge", what, "--out", tmp_path / "m.parquet"), f"merge: {what} {why}")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- prompts


def prompts_parquet(path: Path, ids: list, texts: list) -> Path:
    pq.write_table(pa.table({"prompt_id": pa.array(ids, pa.string()), "prompt": pa.array(texts, pa.string())}), path)
    return path


def test_null_and_control_character_prompts_are_refused_naming_the_row(tmp_path):
    from vpotool.prompts import load_prompts

    path = prompts_parquet(tmp_path / "null.parquet", ["a", "b"], ["a red circle", None])
    with pytest.raises(VpoError, match=r"row 1: prompt is null"):
        load_prompts(str(path))  # it became the prompt "None"
    path = prompts_parquet(tmp_path / "nul.parquet", ["a", "b"], ["a red circle", "\x00\x00\x00"])
    with pytest.raises(VpoError, match=r"row 1 \(prompt_id b\): the prompt holds the control character '\\x00'"):
        load_prompts(str(path))
    path = prompts_parquet(tmp_path / "id.parquet", ["a", None], ["a red circle", "a blue square"])
    with pytest.raises(VpoError, match=r"row 1: prompt_id is null"):
        load_prompts(str(path))
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n# note\na blue\x1b[31m square\n")
    with pytest.raises(VpoError, match=r"p.txt line 4: the prompt holds the control character '\\x1b'"):
        load_prompts(str(txt))
    txt.write_text("a red circle\tmoving left\na green ring 🙂‍↔️ moving down\n")  # tabs and emoji sequences pass
    assert [t for _, t in load_prompts(str(txt))] == ["a red circle\tmoving left", "a green ring 🙂‍↔️ moving down"]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from vpotool.prompts import load_prompts
    from vpotool.stages.eval import world_specs
    from vpotool.world import world_prompts

    texts = [w.text for w in world_prompts("heldout")[:3]]
    path = tmp_path / "world.txt"
    path.write_bytes("\ufeff".encode() + "\n".join(texts).encode() + b"\n")
    loaded = [t for _, t in load_prompts(str(path))]
    assert loaded == texts
    assert world_specs(loaded) is not None  # eval takes them for tiny-world prompts
