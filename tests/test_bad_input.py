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


# ---------------------------------------------------------------- pair


def test_pair_refuses_repeated_score_rows_and_scores_of_other_samples(cli, tmp_path):
    from vpotool.stages.pair import select_pairs

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        run = runs[name] = tmp_path / name
        assert cli("sample", "--prompts", prompts, "--candidates", 3, "--out", run, *FAST, "--seed", seed)[0] == 0
    scores = runs["a"] / "scores.parquet"
    assert cli("score", "--samples", runs["a"] / "samples.parquet", "--reward", "temporal", "--out", scores)[0] == 0
    pairs = tmp_path / "pairs.parquet"
    # Run b's sample ids are run a's: pairing by id joined b's videos with a's scores.
    args = ("pair", "--scores", scores, "--out", pairs, "--strategy", "all")
    refused(cli(*args, "--samples", runs["b"] / "samples.parquet"), "scores other samples", "a/samples.parquet")
    table = pq.read_table(scores)
    repeated = pa.concat_tables([table, table.slice(1, 1)]).replace_schema_metadata(table.schema.metadata)
    twice = tmp_path / "twice.parquet"
    pq.write_table(repeated, twice)
    sid = table.column("sample_id")[1].as_py()
    line = refused(cli(*args[:2], twice, *args[3:], "--samples", runs["a"] / "samples.parquet"), f"{sid} twice")
    assert "temporal" in line and not pairs.exists()
    assert cli(*args, "--samples", runs["a"] / "samples.parquet")[0] == 0
    assert len(pq.read_table(pairs)) == 3  # every ordered pair of 3 distinct scores, once each
    # A sample listed twice with two scores is never paired with itself.
    assert select_pairs([("s1", 2.0), ("s1", 1.0), ("s2", 0.0)], "all", 0.0) == [(0, 2), (1, 2)]


# ---------------------------------------------------------------- merge


def test_merge_refuses_shards_whose_columns_or_types_differ_naming_the_shard_and_column(tmp_path):
    from vpotool.manifest import merge_manifests, write_manifest, write_table

    def scores(path: Path, sid: str, **dims) -> Path:
        write_manifest(path, [dict(sample_id=sid, prompt_id="p0", reward="temporal", overall=0.5, **dims)], "scores")
        return path

    a = scores(tmp_path / "a.parquet", "s1", smooth=0.1)
    b = scores(tmp_path / "b.parquet", "s2", flicker=0.2)
    out = tmp_path / "out.parquet"
    with pytest.raises(VpoError, match=r"b.parquet lacks column smooth, which .*a.parquet has") as e:
        merge_manifests([a, b], out)
    assert "\n" not in str(e.value)
    c = scores(tmp_path / "c.parquet", "s3", smooth=0.1)
    table = pq.read_table(c)
    as_text = table.set_column(table.schema.get_field_index("overall"), "overall", pa.array(["0.5"]))
    write_table(as_text.replace_schema_metadata(table.schema.metadata), c)
    with pytest.raises(VpoError, match=r"c.parquet has column overall of type string, a scores manifest has double"):
        merge_manifests([a, c], out)
    smooth = table.schema.get_field_index("smooth")
    write_table(table.set_column(smooth, "smooth", pa.array(["x"])).replace_schema_metadata(table.schema.metadata), c)
    with pytest.raises(VpoError, match=r"c.parquet has column smooth of type string"):
        merge_manifests([a, c], out)
    write_table(table.cast(table.schema.set(smooth, pa.field("smooth", pa.float32()))), c)
    with pytest.raises(VpoError, match=r"c.parquet has column smooth of type float, .*a.parquet of type double"):
        merge_manifests([a, c], out)
    assert not out.exists()
    assert merge_manifests([a, scores(tmp_path / "d.parquet", "s4", smooth=0.3)], out) == ("scores", 2)


# ---------------------------------------------------------------- a full disk


def fail_after(n: int, write):
    """``write`` that raises ENOSPC, as a full disk does, from its ``n + 1``-th call on."""
    import errno

    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)

    return full


def test_a_full_disk_stops_sample_and_score_in_one_line_keeping_their_rows(cli, prompts_file, tmp_path, monkeypatch):
    from vpotool import video
    from vpotool.manifest import pq as manifest_pq

    run = tmp_path / "run"
    args = ("sample", "--prompts", prompts_file, "--candidates", 2, "--batch-size", 2, "--out", run, *FAST)
    with monkeypatch.context() as m:
        m.setattr(video, "_encode", fail_after(2, video._encode))  # the second batch's first video
        refused(cli(*args), "no space left on device writing", "p00001-c00.mp4", "free space or pass another --out")
    assert pq.read_table(run / "samples.parquet").column("sample_id").to_pylist() == ["p00000-c00", "p00000-c01"]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert cli(*args)[0] == 0 and len(pq.read_table(run / "samples.parquet")) == 4
    scores = run / "scores.parquet"
    args = ("score", "--samples", run / "samples.parquet", "--reward", "temporal", "--batch-size", 2, "--out", scores)
    with monkeypatch.context() as m:
        m.setattr(manifest_pq, "write_table", fail_after(1, manifest_pq.write_table))  # the second batch's flush
        refused(cli(*args), "no space left on device writing", "scores.parquet")
    assert len(pq.read_table(scores)) == 2
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert cli(*args)[0] == 0 and len(pq.read_table(scores)) == 4


def test_a_full_disk_stops_train_dpo_without_a_half_checkpoint_and_resume_works(cli, tmp_path, monkeypatch):
    from test_train_dpo import write_pairs

    from vpotool.training import common

    pairs = write_pairs(tmp_path)
    out = tmp_path / "run"
    args = ("train-dpo", "--pairs", pairs, "--out", out, "--max-steps", 2, "--save-every", 1, "--batch-size", 2)
    args += ("--lora-rank", 2, "--device", "cpu")
    with monkeypatch.context() as m:
        # step 1 saves whole; step 2's adapter is written, its trainer state meets a full disk
        m.setattr(common, "write_safetensors", fail_after(1, common.write_safetensors))
        refused(cli(*args), "no space left on device writing", "step-2", "free space or pass another --out")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert cli(*args)[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert pq.read_table(out / "metrics.parquet").column("step").to_pylist() == [1, 2]


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("content", ["nothing", "other weights"])
def test_an_adapter_folder_without_lora_weights_stops_before_any_sampling(cli, prompts_file, tmp_path, content):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "step-1"
    folder.mkdir()
    if content == "other weights":
        save_file({"proj.weight": torch.zeros(2, 2)}, str(folder / "pytorch_lora_weights.safetensors"))
    why = "no LoRA adapter at" if content == "nothing" else "holds no LoRA weights"
    run, ev = tmp_path / "run", tmp_path / "eval"
    refused(cli("sample", "--prompts", prompts_file, "--out", run, "--adapter", folder, *FAST), why, "step-N")
    args = ("eval", "--prompts", prompts_file, "--out", ev, "--adapter", folder, "--reward", "flicker", *FAST)
    refused(cli(*args), "no LoRA adapter" if content == "nothing" else why)
    assert not run.exists() and not ev.exists()  # nothing sampled, no folder made


# ---------------------------------------------------------------- absurd sizes


@pytest.fixture
def machine_of_64_gib(monkeypatch):
    """Every device has 64 GiB, so what is refused does not depend on the machine running the tests."""
    from vpotool import memory

    monkeypatch.setattr(memory, "device_memory", lambda device: (64 * 2**30, "the 64 GiB device"))


def test_absurd_sample_sizes_and_lora_ranks_are_refused_up_front(cli, prompts_file, tmp_path, machine_of_64_gib):
    from test_train_dpo import write_pairs

    run = tmp_path / "run"
    base = ("sample", "--prompts", prompts_file, "--out", run, "--frames", 9, "--steps", 2, "--device", "cpu")
    line = refused(
        cli(*base, "--candidates", 10**9), "sampling 1000000000 videos", "more than the 64 GiB device has (64.0 GiB)"
    )
    assert "lower --candidates" in line
    refused(cli(*base, "--height", 16000, "--width", 16000), "of 16000x16000", "GiB, more than the 64 GiB device")
    assert not list(run.rglob("*.parquet"))
    pairs = write_pairs(tmp_path)
    args = ("train-dpo", "--pairs", pairs, "--out", tmp_path / "t", "--max-steps", 1, "--device", "cpu")
    line = refused(cli(*args, "--lora-rank", 10**6), "--lora-rank 1000000 (18,432,000,000 LoRA parameters")
    assert "lower --lora-rank" in line and not (tmp_path / "t" / "checkpoints").exists()


def test_large_runs_that_fit_a_big_gpu_are_not_refused(monkeypatch):
    """Wan 2.1 at 720p, 81 frames, 8 videos a call: about 7 GiB of latents and frames; a rank-128 LoRA on the
    attention projections of 40 blocks of width 5120 (a 14B model): 1.6 GiB with its optimizer state. Both fit an
    80 GiB GPU."""
    import torch

    from vpotool import memory

    monkeypatch.setattr(memory, "device_memory", lambda device: (80 * 2**30, "an 80 GiB GPU"))
    need = memory.video_call_bytes(8, (16, 21, 90, 160), 81, 720, 1280)
    assert 6 * 2**30 < need < 8 * 2**30
    memory.check_fits(need, "cuda", "sampling", "")

    def block():
        return torch.nn.ModuleDict({n: torch.nn.Linear(5120, 5120, device="meta") for n in ("to_q", "to_k", "to_v")})

    model = torch.nn.ModuleDict({f"b{i}": block() for i in range(40)})
    n = memory.lora_parameters(model, 128, ["to_q", "to_k"])
    assert n == 40 * 2 * 128 * (5120 + 5120)
    memory.check_fits(16 * n, "cuda", "a LoRA", "")
    with pytest.raises(VpoError, match="more than an 80 GiB GPU has"):
        memory.check_fits(16 * memory.lora_parameters(model, 10**6, ["to_q"]), "cuda", "a LoRA", "lower it")


# ---------------------------------------------------------------- resuming a trainer


def test_train_dpo_resumes_from_a_copy_of_its_pairs_and_refuses_pairs_rewritten_in_place(cli, tmp_path):
    import shutil

    from test_train_dpo import write_pairs

    pairs = write_pairs(tmp_path)
    out = tmp_path / "run"
    args = ("train-dpo", "--out", out, "--batch-size", 2, "--lora-rank", 2, "--device", "cpu", "--save-every", 1)
    assert cli(*args, "--pairs", pairs, "--max-steps", 1)[0] == 0
    copy = tmp_path / "copy.parquet"
    shutil.copy(pairs, copy)
    code, _, err = cli(*args, "--pairs", copy, "--max-steps", 2)  # the same pairs at another path
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    table = pq.read_table(copy)
    pq.write_table(table.slice(0, 3).replace_schema_metadata(table.schema.metadata), copy)
    before = snapshot(out)
    refused(cli(*args, "--pairs", copy, "--max-steps", 3), "other settings", "the contents of --pairs", "new --out")
    assert snapshot(out) == before


# ---------------------------------------------------------------- temporal rewards on 1-frame videos


def test_temporal_rewards_refuse_one_frame_videos(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    run = tmp_path / "run"
    size = ("--frames", 1, "--height", 16, "--width", 16, "--steps", 2, "--device", "cpu")
    assert cli("sample", "--prompts", prompts, "--candidates", 2, "--out", run, *size)[0] == 0
    args = ("score", "--samples", run / "samples.parquet", "--out", run / "scores.parquet", "--reward")
    for reward in ("flicker", "smoothness", "dynamics", "temporal", "brightness,world", "brightness:1,dynamics:1"):
        name = reward.split(",")[-1].split(":")[0]
        refused(cli(*args, reward), f"reward {name} compares frames", "at least 2 frames", "1-frame videos")
    assert not (run / "scores.parquet").exists() and not (run / "scores.yaml").exists()
    assert cli(*args, "brightness")[0] == 0  # a per-frame reward scores them


@pytest.mark.parametrize(
    "args",
    [
        ["train-scst", "--reward", "temporal"],
        ["train-refl", "--reward", "brightness:1,flicker:1"],
        ["train-refl", "--reward", "flicker", "--frames", 9, "--reward-frames", 1],
        ["loop", "--reward", "world", "--iterations", 1],
    ],
)
def test_trainers_refuse_temporal_rewards_on_one_frame_rollouts(args, cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    size = ["--frames", 1] if "--frames" not in args else []
    code, _, err = cli(*args, "--prompts", prompts, *size, "--height", 16, "--width", 16, "--steps", 2,
                       "--max-steps", 1, "--device", "cpu", "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and "compares frames and needs videos of at least 2 frames" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o" / "checkpoints").exists()


def test_frames_a_video_vae_cannot_make_are_refused_naming_the_nearest(cli, tmp_path):
    """Wan's VAE makes 4k + 1 frames: --frames 4 sampled 1-frame videos with exit 0."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    code, _, err = cli("sample", "--prompts", prompts, "--frames", 4, "--height", 16, "--width", 16, "--steps", 2,
                       "--device", "cpu", "--out", tmp_path / "s")  # fmt: skip
    assert code == 2 and "--frames 4: this model's video VAE makes 4k + 1 frames" in err and "--frames 1 or 5" in err
    assert not (tmp_path / "s" / "samples.parquet").exists()
