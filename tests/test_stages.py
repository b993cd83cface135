"""The sample -> score -> pair chain on the tiny model: artifacts, determinism, resume, shards, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST, family_args, one_line_error, run_chain
from safetensors.torch import load_file

from vpotool.video import read_video


def test_chain_writes_readable_artifacts(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(samples) == 4 and set(samples.candidate) == {0, 1}
    for row in samples.itertuples():
        frames = read_video(run / row.video)
        assert frames.shape[0] == row.frames == 9
        assert frames.shape[1:3] == (16, 16)
        assert load_file(run / row.latent)["latents"].shape == (16, 3, 4, 4)
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) == 4 and {"flicker", "smoothness", "dynamic_degree", "overall"} <= set(scores.columns)
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert len(pairs) == 2
    assert (pairs.chosen_score > pairs.rejected_score).all()
    by_id = scores.set_index("sample_id").overall
    for p in pairs.itertuples():
        assert by_id[p.chosen_id] == p.chosen_score > by_id[p.rejected_id] == p.rejected_score
        assert (run / p.chosen_video).is_file() and (run / p.rejected_latent).is_file()
    meta = pq.read_schema(run / "pairs.parquet").metadata
    assert meta[b"vpotool.schema"] == b"pairs" and b"min_margin" in meta[b"vpotool.config"]
    assert (run / "sample.yaml").is_file() and "frames: 9" in (run / "sample.yaml").read_text()


def test_same_seed_same_latents_and_other_seed_differs(cli, prompts_file, tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        args = ("sample", "--prompts", prompts_file, "--candidates", 2, "--out", tmp_path / name, "--seed", seed)
        assert cli(*args, *FAST, "--batch-size", 2 if name == "b" else 8)[0] == 0
    lat = {n: load_file(tmp_path / n / "latents" / "p00001-c01.safetensors")["latents"] for n in "abc"}
    # batching differs, latents do not (to float rounding: a CPU matrix product may pick another kernel per size)
    torch.testing.assert_close(lat["a"], lat["b"], rtol=0, atol=1e-4)
    assert not torch.allclose(lat["a"], lat["c"])
    a = load_file(tmp_path / "a" / "latents" / "p00000-c00.safetensors")["latents"]
    assert not torch.allclose(a, lat["a"])  # candidates differ


def test_interrupted_sample_resumes_without_redoing_rows(cli, prompts_file, tmp_path, monkeypatch):
    import vpotool.stages.sample as stage

    real, calls = stage.generate, []

    def flaky(backend, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(backend, prompts, *a, **k)

    monkeypatch.setattr(stage, "generate", flaky)
    run = tmp_path / "run"
    code, _, err = cli("sample", "--prompts", prompts_file, "--candidates", 2, "--batch-size", 2, "--out", run, *FAST)
    assert code == 130 and "resume" in err
    assert list(pd.read_parquet(run / "samples.parquet").sample_id) == ["p00000-c00", "p00000-c01"]
    first = (run / "videos" / "p00000-c00.mp4").stat().st_mtime_ns
    calls.clear()
    assert cli("sample", "--prompts", prompts_file, "--candidates", 2, "--batch-size", 2, "--out", run, *FAST)[0] == 0
    assert calls == [2]  # only the unfinished prompt was sampled
    assert len(pd.read_parquet(run / "samples.parquet")) == 4
    assert (run / "videos" / "p00000-c00.mp4").stat().st_mtime_ns == first
    # A finished run is a no-op; changed settings are refused rather than mixed in.
    calls.clear()
    assert cli("sample", "--prompts", prompts_file, "--candidates", 2, "--out", run, *FAST)[0] == 0 and calls == []
    code, _, err = cli("sample", "--prompts", prompts_file, "--candidates", 2, "--out", run, *FAST[:-2], "--steps", 5)
    assert code == 2 and "steps" in err


def test_score_resumes_and_adds_a_second_reward(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    code, _, _ = cli(
        "score", "--samples", run / "samples.parquet", "--reward", "temporal,flicker", "--out", run / "scores.parquet"
    )
    assert code == 0
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) == 8 and set(scores.reward) == {"temporal", "flicker"}
    code, _, err = cli(
        "pair", "--samples", run / "samples.parquet", "--scores", run / "scores.parquet", "--out", run / "p.parquet"
    )
    assert code == 2 and "--reward" in err
    args = ("--samples", run / "samples.parquet", "--scores", run / "scores.parquet", "--out", run / "p.parquet")
    assert cli("pair", *args, "--reward", "flicker", "--dimension", "flicker")[0] == 0


def test_pair_strategy_all_and_margin(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    cli("sample", "--prompts", prompts_file, "--candidates", 3, "--out", run, *FAST)
    cli("score", "--samples", run / "samples.parquet", "--out", run / "scores.parquet")
    args = ("pair", "--samples", run / "samples.parquet", "--scores", run / "scores.parquet")
    assert cli(*args, "--out", run / "all.parquet", "--strategy", "all")[0] == 0
    allp = pd.read_parquet(run / "all.parquet")
    assert len(allp) == 6 and (allp.margin > 0).all()  # 3 ordered pairs per prompt (ties aside)
    cut = float(np.median(allp.margin))
    assert cli(*args, "--out", run / "cut.parquet", "--strategy", "all", "--min-margin", cut)[0] == 0
    assert (pd.read_parquet(run / "cut.parquet").margin >= cut).all()
    code, _, err = cli(*args, "--out", run / "none.parquet", "--min-margin", 10)
    assert code == 2 and "no pairs" in err


def test_shards_merge_to_the_full_run(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a red circle moving left {i}" for i in range(3)) + "\n")
    for i in range(2):
        out = tmp_path / f"shard{i}"
        assert cli("sample", "--prompts", prompts, "--candidates", 1, "--out", out, "--shard", f"{i}/2", *FAST)[0] == 0
    assert (tmp_path / "shard0" / "samples-00000-of-00002.parquet").is_file()
    inputs = [
        tmp_path / "shard0" / "samples-00000-of-00002.parquet",
        tmp_path / "shard1" / "samples-00001-of-00002.parquet",
    ]
    assert cli("merge", *inputs, "--out", tmp_path / "merged" / "samples.parquet")[0] == 0
    merged = pd.read_parquet(tmp_path / "merged" / "samples.parquet")
    assert sorted(merged.sample_id) == ["p00000-c00", "p00001-c00", "p00002-c00"]
    for v in merged.video:
        assert read_video(tmp_path / "merged" / v).shape[0] == 9
    assert cli("score", "--samples", tmp_path / "merged" / "samples.parquet", "--out", tmp_path / "s.parquet")[0] == 0


def test_bad_input_gives_one_clear_line(cli, prompts_file, tmp_path):
    run = tmp_path / "run"
    one_line_error(cli("sample", "--prompts", tmp_path / "nope.txt", "--out", run), "prompts file not found")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    one_line_error(cli("sample", "--prompts", tmp_path / "empty.txt", "--out", run), "no prompts")
    one_line_error(cli("sample", "--prompts", prompts_file, "--out", run, "--model", "sora9"), "unknown model", "tiny")
    one_line_error(cli("sample", "--prompts", prompts_file, "--out", run, "--shard", "3/2"), "--shard")
    one_line_error(cli("sample", "--prompts", prompts_file, "--out", run, "--candidates", "0"), "--candidates")
    one_line_error(cli("sample", "--prompts", prompts_file, "--out", run, "--height", "30"), "multiples of 8")
    one_line_error(cli("sample", "--prompts", prompts_file, "--out", run, "--model", "wan"), "--model-path")
    one_line_error(
        cli("sample", "--prompts", prompts_file, "--out", run, "--model", "wan", "--model-path", tmp_path / "x"),
        "not found",
    )

    run_chain(cli, prompts_file, run)
    samples, scores = run / "samples.parquet", run / "scores.parquet"
    one_line_error(
        cli("score", "--samples", samples, "--reward", "vibes", "--out", scores), "unknown reward", "temporal"
    )
    one_line_error(
        cli("score", "--samples", scores, "--out", tmp_path / "s.parquet"), "is a scores manifest", "vpotool sample"
    )
    one_line_error(
        cli("pair", "--samples", samples, "--scores", samples, "--out", tmp_path / "p.parquet"),
        "is a samples manifest",
    )
    one_line_error(
        cli("pair", "--samples", samples, "--scores", scores, "--out", tmp_path / "p.parquet", "--dimension", "x"),
        "dimension",
    )

    (run / "videos" / "p00001-c00.mp4").write_bytes(b"\x00not an mp4" * 50)
    one_line_error(
        cli("score", "--samples", samples, "--reward", "flicker", "--batch-size", 2, "--out", tmp_path / "s2.parquet"),
        "corrupt",
        "p00001-c00",
    )
    assert len(pd.read_parquet(tmp_path / "s2.parquet")) == 2  # the first prompt's rows survive the failure

    table = pd.read_parquet(scores)
    table.loc[0, "overall"] = math.nan
    from vpotool.manifest import write_manifest

    write_manifest(tmp_path / "nan.parquet", table.to_dict("records"), "scores")
    one_line_error(
        cli("pair", "--samples", samples, "--scores", tmp_path / "nan.parquet", "--out", tmp_path / "p.parquet"),
        "non-finite",
    )


@pytest.mark.parametrize("bad", ["yaml", "unknown-key"])
def test_config_file_errors(cli, prompts_file, tmp_path, bad):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("candidates: [1\n" if bad == "yaml" else "candidatez: 2\n")
    one_line_error(cli("sample", "--config", cfg, "--prompts", prompts_file, "--out", tmp_path / "r"), str(cfg))


def test_config_file_sets_options_and_flags_override(cli, prompts_file, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"prompts: {prompts_file}\ncandidates: 3\nframes: 9\nheight: 16\nwidth: 16\nsteps: 2\n")
    assert cli("sample", "--config", cfg, "--candidates", 1, "--out", tmp_path / "r")[0] == 0
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    assert len(samples) == 2 and set(samples.steps) == {2}


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx"])
def test_chain_on_saved_diffusers_checkpoints(cli, prompts_file, tmp_path, family):
    from families import FAMILY_SIZES, make_tiny_checkpoint

    run = tmp_path / "run"
    run_chain(cli, prompts_file, run, *family_args(family, make_tiny_checkpoint(family, tmp_path / family)))
    _, height, width = FAMILY_SIZES[family]
    samples = pd.read_parquet(run / "samples.parquet")
    assert set(samples.model) == {family} and len(samples) == 4
    for row in samples.itertuples():
        assert read_video(run / row.video).shape[:3] == (row.frames, height, width)
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert len(pairs) == 2 and (pairs.chosen_score > pairs.rejected_score).all()


def test_save_trajectory_stores_states_and_logps_that_the_model_reproduces(cli, prompts_file, tmp_path):
    from vpotool.models import load_backend
    from vpotool.sampling import seeded_noise, step_logp

    run = tmp_path / "run"
    args = ("sample", "--prompts", prompts_file, "--candidates", 2, "--out", run, *FAST, "--noise-level", 0.7)
    assert cli(*args, "--save-trajectory")[0] == 0
    rows = pd.read_parquet(run / "samples.parquet")
    files = [load_file(run / p) for p in rows.latent]
    for f, seed in zip(files, rows.seed, strict=True):
        assert f["states"].shape == (4, 16, 3, 4, 4) and f["states"].dtype == torch.float32  # S + 1 = 4 states
        assert f["logps"].shape == (3,) and torch.isfinite(f["logps"]).all()
        assert torch.equal(f["states"][-1], f["latents"])
        assert torch.equal(f["states"][0], seeded_noise((16, 3, 4, 4), [int(seed)], "cpu")[0])

    # The unchanged model gives the stored transitions the stored log-probabilities (guidance 4: both branches).
    b = load_backend("tiny")
    states = torch.stack([f["states"] for f in files], 1)  # [S + 1, B, C, F, h, w]
    cond, uncond = b.encode_prompts(list(rows.prompt)), b.encode_negative(len(rows))
    sched = b.schedule(3, (16, 3, 4, 4))
    with torch.no_grad():
        for i in range(3):
            logp, _, _ = step_logp(b, sched, i, states[i], states[i + 1], cond, uncond, 4.0, 0.7)
            torch.testing.assert_close(logp, torch.stack([f["logps"][i] for f in files]), atol=1e-5, rtol=1e-5)

    one_line_error(cli(*args), "save_trajectory")  # resuming without the flag would mix files with and without
    one_line_error(cli(*args[:-2], "--save-trajectory"), "--noise-level", "--save-trajectory")


def test_rerun_removes_a_killed_runs_half_written_files(cli, prompts_file, tmp_path):
    import subprocess
    import sys

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)  # fmt: skip
    run = tmp_path / "run"
    stale = [run / "videos" / f".p00000-c00.mp4.{pid}.tmp.mp4", run / "latents" / f".p00000-c00.safetensors.{pid}.tmp",
             run / f".samples.parquet.{pid}.tmp"]  # fmt: skip
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half written")
    code, _, err = cli("sample", "--prompts", prompts_file, "--candidates", 1, "--out", run, *FAST)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in (run / "videos").iterdir()) == ["p00000-c00.mp4", "p00001-c00.mp4"]
