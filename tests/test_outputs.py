"""Outputs stay intact: one writer per output, one line for an output path that cannot be written, and a refused
resume under settings that would change the results. Every refusal exits 2 with one stderr line and leaves the
earlier outputs byte for byte as they were."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, run_chain

HOLD = """import sys
from vpotool.locks import acquire_output_lock
with acquire_output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
"""


def env() -> dict:
    """The environment for a child vpotool process: this interpreter's import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> contents), to compare before and after a refused run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, *words) -> str:
    """Assert a run stopped with exit status 2 and one stderr line holding ``words``; returns that line."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(c.isprintable() for c in err.strip()), repr(err)
    for w in words:
        assert w in err, err
    return err


@contextmanager
def held(output: Path):
    """Another process holding the writer lock of ``output`` (as a running stage would); yields its PID."""
    with subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=env()) as holder:  # fmt: skip
        try:
            assert holder.stdout.readline() == "held\n"
            yield holder.pid
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)


@contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable for this process: mode 555, or for root (whom modes do not stop) the immutable
    attribute, which stops root too. Skips the test when neither can be set here."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    made = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
    if not made:
        pytest.skip("running as root, and chattr +i is not available here: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


# ---------------------------------------------------------------- one writer per output


def test_a_second_writer_of_one_output_is_refused(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    other = tmp_path / "other.txt"
    other.write_text("a green ring moving down\n")
    before = snapshot(run)
    with held(run / "samples.parquet") as pid:
        refused(cli("sample", "--prompts", other, "--out", run, *FAST), "another vpotool process", f"PID {pid}")
    with held(run / "scores.parquet") as pid:
        args = ("score", "--samples", run / "samples.parquet", "--out", run / "scores.parquet")
        refused(cli(*args), "another vpotool process", f"PID {pid}", "another --out")
    with held(run) as pid:
        refused(cli("loop", "--out", run, "--iterations", 1, *FAST), "another vpotool process", f"PID {pid}")
        pairs = run / "pairs.parquet"
        refused(cli("train-dpo", "--pairs", pairs, "--out", run, "--max-steps", 1, "--device", "cpu"), f"PID {pid}")
    assert snapshot(run) == before


def test_two_sample_processes_on_one_out_leave_one_consistent_run(tmp_path):
    run = tmp_path / "run"
    procs = []
    for i, text in enumerate(["a red circle moving left\na blue square moving up\n", "a green ring moving down\n"]):
        (tmp_path / f"p{i}.txt").write_text(text)
        args = ["sample", "--prompts", tmp_path / f"p{i}.txt", "--candidates", 2, "--out", run, *FAST]
        procs.append(subprocess.Popen([sys.executable, "-m", "vpotool", *map(str, args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env()))  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser, loser
    assert "another vpotool process" in loser or "other settings" in loser  # refused while, or after, the other ran
    rows = pd.read_parquet(run / "samples.parquet")
    assert len(rows) in (2, 4) and rows.sample_id.is_unique
    assert sorted(p.name for p in (run / "videos").iterdir()) == sorted(f"{s}.mp4" for s in rows.sample_id)


def test_shards_of_one_job_write_one_folder_at_the_same_time(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green ring moving down\n")
    run = tmp_path / "run"
    args = ["--prompts", prompts, "--candidates", 1, "--out", run, *FAST]
    procs = [
        subprocess.Popen([sys.executable, "-m", "vpotool", "sample", *map(str, args), "--shard", f"{i}/2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        for i in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ids = [pd.read_parquet(run / f"samples-0000{i}-of-00002.parquet").sample_id.tolist() for i in range(2)]
    assert ids == [["p00000-c00", "p00002-c00"], ["p00001-c00"]]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no lock or temp file left


# ---------------------------------------------------------------- output paths that cannot be written


def test_an_output_path_that_is_a_file_or_a_folder_is_one_line(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    samples = run / "samples.parquet"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    before = snapshot(tmp_path)
    refused(cli("sample", "--prompts", prompts_file, "--out", notes, *FAST), "is an existing file", "folder")
    refused(cli("sample", "--prompts", prompts_file, "--out", notes / "run", *FAST), "cannot create", "--out")
    refused(cli("score", "--samples", samples, "--out", run / "videos"), "should be a .parquet")
    (tmp_path / "dir.parquet").mkdir()
    refused(cli("score", "--samples", samples, "--out", tmp_path / "dir.parquet"), "is an existing folder")
    refused(cli("score", "--samples", samples, "--out", notes / "scores.parquet"), "notes.txt is an existing file")
    (tmp_path / "dir.parquet").rmdir()
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet\n")
    before[fake.name] = fake.read_bytes()
    refused(cli("score", "--samples", samples, "--out", fake), "not a readable Parquet file")
    refused(cli("pair", "--samples", samples, "--scores", run / "scores.parquet", "--out", samples), "also --samples")
    refused(cli("score", "--samples", samples, "--out", samples), "is a samples manifest")
    refused(cli("train-dpo", "--pairs", run / "pairs.parquet", "--out", notes, "--device", "cpu"), "existing file")
    assert snapshot(tmp_path) == before


def test_a_read_only_output_folder_is_one_line(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    code, _, err = cli("train-dpo", "--pairs", run / "pairs.parquet", "--out", run / "dpo", "--max-steps", 1,
                       "--lora-rank", 2, "--batch-size", 2, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    more = tmp_path / "more.txt"
    more.write_text("a green ring moving down\n")
    before = snapshot(run)
    with read_only(run):
        refused(cli("sample", "--prompts", prompts_file, "--out", run, "--candidates", 3, *FAST), "cannot", str(run))
        refused(cli("score", "--samples", run / "samples.parquet", "--out", run / "s2.parquet"), "cannot", str(run))
        args = ("--pairs", run / "pairs.parquet", "--lora-rank", 2, "--batch-size", 2, "--device", "cpu")
        with read_only(run / "dpo"):
            refused(cli("train-dpo", *args, "--out", run / "dpo", "--max-steps", 2), "cannot write in", "dpo")
    assert snapshot(run) == before


# ---------------------------------------------------------------- merge


def corrupt(path: Path, out: Path) -> Path:
    """A copy of a Parquet file with 8 bytes overwritten after its header: pyarrow's message for it holds a control
    byte and newlines."""
    data = bytearray(path.read_bytes())
    data[4:12] = b"\xff" * 8
    out.write_bytes(bytes(data))
    return out


def test_merge_refuses_damaged_repeated_and_overwritten_inputs(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    shards = []
    for i in range(2):
        assert (
            cli("sample", "--prompts", prompts, "--candidates", 1, "--out", tmp_path, "--shard", f"{i}/2", *FAST)[0]
            == 0
        )
        shards.append(tmp_path / f"samples-0000{i}-of-00002.parquet")
    merged = tmp_path / "samples.parquet"
    assert cli("merge", *shards, "--out", merged)[0] == 0
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(shards[1].read_bytes()[:-100])
    damaged = corrupt(shards[1], tmp_path / "damaged.parquet")
    link = tmp_path / "link.parquet"
    link.symlink_to(shards[0])
    before = snapshot(tmp_path)
    refused(cli("merge", shards[0], truncated, "--out", merged), "truncated.parquet", "not a readable Parquet")
    refused(cli("merge", shards[0], damaged, "--out", merged), "damaged.parquet", "not a readable Parquet")
    refused(cli("merge", shards[0], shards[0], "--out", merged), "given twice")
    refused(cli("merge", shards[0], link, "--out", merged), "given twice")
    refused(cli("merge", shards[0], shards[1], "--out", shards[1]), "also an input")
    refused(cli("merge", shards[0], shards[1], "--out", tmp_path), "is a folder")
    refused(cli("pair", "--samples", damaged, "--scores", damaged, "--out", tmp_path / "x.parquet"), "damaged")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- resuming under other settings


def test_sample_refuses_other_prompts_or_settings_and_allows_harmless_changes(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    args = ("sample", "--candidates", 2, "--out", run)
    assert cli(*args, "--prompts", prompts_file, *FAST)[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("a green ring moving down\na yellow dot moving right\n")
    before = snapshot(run)
    refused(cli(*args, "--prompts", other, *FAST), "other settings", "prompts", "new --out")
    line = refused(cli(*args, "--prompts", prompts_file, *FAST[:-4], "--steps", 4, "--guidance", 2), "new --out")
    assert "steps 3 -> 4" in line and "guidance" in line and "prompts" not in line
    refused(cli(*args, "--prompts", prompts_file, *FAST, "--seed", 1), "seed 0 -> 1")
    refused(cli(*args[:2], 3, *args[3:], "--prompts", prompts_file, *FAST), "candidates 2 -> 3")
    assert snapshot(run) == before  # sample.yaml included: a refused run does not rewrite it
    # The same prompts from another file, another batch size: nothing to redo, nothing refused.
    copy = tmp_path / "copy.txt"
    copy.write_text(prompts_file.read_text())
    assert cli(*args, "--prompts", copy, *FAST, "--batch-size", 1)[0] == 0
    after = snapshot(run)
    assert {k: v for k, v in after.items() if "/" in k} == {k: v for k, v in before.items() if "/" in k}
    assert len(pd.read_parquet(run / "samples.parquet")) == 4


def test_score_refuses_other_samples_and_names_its_config_after_its_output(cli, prompts_file, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    run_chain(cli, prompts_file, run)
    assert cli("sample", "--prompts", prompts_file, "--candidates", 2, "--out", other, *FAST, "--seed", 5)[0] == 0
    before = snapshot(run)
    args = ("score", "--reward", "temporal", "--out", run / "scores.parquet")
    refused(cli(*args[:-2], "--samples", other / "samples.parquet", *args[-2:]), "other settings", "samples")
    refused(cli(*args, "--samples", run / "samples.parquet", "--dtype", "float16"), "dtype")
    assert snapshot(run) == before
    # A second scores file in the same folder has its own resolved config.
    assert (
        cli("score", "--samples", run / "samples.parquet", "--reward", "flicker", "--out", run / "f.parquet")[0] == 0
    )
    assert (run / "scores.yaml").read_bytes() == before["scores.yaml"]
    assert "reward: flicker" in (run / "f.yaml").read_text()
    assert (run / "pairs.yaml").is_file() and not (run / "score.yaml").exists()
    # --dtype auto (the default) is float32 on a CPU: the same run, so naming float32 resumes it
    assert cli(*args, "--samples", run / "samples.parquet", "--dtype", "float32")[0] == 0


def test_a_shard_without_prompts_says_how_many_there_are(cli, prompts_file, tmp_path):
    line = refused(cli("sample", "--prompts", prompts_file, "--out", tmp_path / "r", "--shard", "5/8", *FAST), "5/8")
    assert "no prompts" in line and "holds 2 prompts" in line and "at most 2 shards" in line
    assert not (tmp_path / "r").exists()


def test_loop_refuses_to_resume_under_options_that_change_its_results(cli, tmp_path):
    from vpotool.config import save_config
    from vpotool.stages.loop import check_loop_resumable
    from vpotool.training.config import LoopConfig

    run = tmp_path / "run"
    saved = LoopConfig(out=str(run), iterations=2, lr=2e-4, lora_rank=8)
    save_config(saved, run / "loop.yaml")
    (run / "iter-0000").mkdir()
    before = snapshot(run)
    line = refused(cli("loop", "--out", run, "--iterations", 2, "--lr", 1e-3, "--lora-rank", 4, "--reward", "flicker"))
    assert (
        "lr" in line and "lora_rank 8 -> 4" in line and "reward 'world' -> 'flicker'" in line and "new --out" in line
    )
    assert snapshot(run) == before
    # More iterations, another device or sampling batch size resume the same run.
    check_loop_resumable(LoopConfig(out=str(run), iterations=5, device="cpu", sample_batch_size=2), run)


@pytest.mark.parametrize("command", ["train-dpo", "train-refl", "train-scst", "loop"])
def test_every_command_with_resume_has_both_flags(command):
    import typer.main

    from vpotool.cli import app

    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    assert params["resume"].opts == ["--resume"] and params["resume"].secondary_opts == ["--no-resume"]


def test_no_resume_and_resume_flags_override_the_yaml_of_a_copied_run(cli, tmp_path):
    """A run folder copied with its resolved config: ``--no-resume`` refuses its checkpoints in one line, and
    ``--resume`` continues it although the YAML says ``resume: false``."""
    import yaml
    from test_train_dpo import write_pairs

    pairs = write_pairs(tmp_path)
    args = ["--pairs", pairs, "--max-steps", 2, "--batch-size", 4, "--lora-rank", 4, "--device", "cpu"]
    code, _, err = cli("train-dpo", *args, "--out", tmp_path / "run")
    assert code == 0, err
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    saved = yaml.safe_load((tmp_path / "copy" / "train-dpo.yaml").read_text())
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump({**saved, "out": str(tmp_path / "copy"), "resume": False}))
    before = snapshot(tmp_path / "copy")
    line = refused(cli("train-dpo", *args, "--out", tmp_path / "copy", "--no-resume"), "already holds checkpoints")
    assert "without --no-resume" in line and "new --out" in line
    refused(cli("train-dpo", "--config", tmp_path / "copy.yaml", "--max-steps", 4), "already holds checkpoints")
    assert snapshot(tmp_path / "copy") == before
    code, _, err = cli("train-dpo", "--config", tmp_path / "copy.yaml", "--max-steps", 4, "--resume")
    assert code == 0, err
    assert list(pd.read_parquet(tmp_path / "copy" / "metrics.parquet").step) == [1, 2, 3, 4]


def test_loop_no_resume_refuses_a_started_run_folder(cli, tmp_path):
    run = tmp_path / "run"
    (run / "iter-0000").mkdir(parents=True)
    before = snapshot(run)
    line = refused(cli("loop", "--out", run, "--no-resume"), str(run), "without --no-resume", "new --out")
    assert snapshot(run) == before and line
