"""Every model-based reward through the user path: `score` and `eval` load a tiny saved checkpoint with
--reward-path, `train-refl` trains on a differentiable one, and bad paths give one line."""

from __future__ import annotations

import math

import pytest
from conftest import FAST
from tiny_rewards import MODEL_REWARDS, save_tiny_reward

from vpotool.manifest import read_manifest
from vpotool.rewards import REWARDS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Two tiny-model videos of two prompts (8 frames of 16x16)."""
    import sys

    from vpotool.cli import main

    run = tmp_path_factory.mktemp("samples")
    prompts = run / "prompts.txt"
    prompts.write_text("a red circle moving left slowly on a black background\na blue square moving up\n")
    argv = sys.argv
    args = ["sample", "--prompts", prompts, "--out", run, "--candidates", 1, *FAST]
    sys.argv = ["vpotool", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        sys.argv = argv
    return run / "samples.parquet"


def test_every_model_reward_is_registered():
    assert set(MODEL_REWARDS) <= set(REWARDS)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_score_loads_each_reward_from_its_path(cli, samples, tmp_path, name):
    path, options = save_tiny_reward(name, tmp_path)
    out = tmp_path / "scores.parquet"
    args = ["score", "--samples", samples, "--reward", name, "--reward-path", path, "--out", out]
    code, _, err = cli(*args, *(["--reward-options", options] if options else []))
    assert code == 0, err
    rows = read_manifest(out, "scores").to_pylist()
    assert len(rows) == 2 and all(r["reward"] == name for r in rows)
    assert all(isinstance(r["overall"], float) for r in rows)


def test_composite_of_two_model_rewards(cli, samples, tmp_path):
    clip, _ = save_tiny_reward("clip", tmp_path)
    raft, options = save_tiny_reward("raft", tmp_path)
    out = tmp_path / "scores.parquet"
    code, _, err = cli(
        "score", "--samples", samples, "--reward", "clip:1,raft:0.5,flicker:1", "--out", out,
        "--reward-path", f"clip={clip},raft={raft}", "--reward-options", options,
    )  # fmt: skip
    assert code == 0, err
    rows = read_manifest(out, "scores").to_pylist()
    assert {"clip.clip_score", "raft.flow_magnitude", "flicker.overall", "overall"} <= set(rows[0])


def test_composite_of_videoalign_and_videoscore2(cli, samples, tmp_path):
    """``--reward videoalign:1.0,videoscore2:0.5`` from the command line on tiny weights (VideoScore2 taught to answer
    in its format): every part's dimensions, VideoScore2's answers, and the composite worked out by hand from each
    part's overall and range, (VA + 3) / 6 and (VS2 - 1) / 4, weighed 1 and 0.5."""
    va, va_options = save_tiny_reward("videoalign", tmp_path)
    vs2, vs2_options = save_tiny_reward("videoscore2", tmp_path)
    out = tmp_path / "scores.parquet"
    code, _, err = cli(
        "score", "--samples", samples, "--reward", "videoalign:1.0,videoscore2:0.5", "--out", out,
        "--reward-path", f"videoalign={va},videoscore2={vs2}", "--reward-options", f"{va_options},{vs2_options}",
    )  # fmt: skip
    assert code == 0, err
    rows = read_manifest(out, "scores").to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert {"videoalign.motion_quality", "videoscore2.physical_consistency"} <= set(r)
        assert 0 < r["videoscore2.visual_quality"] <= 5 and 0 < r["videoscore2.text_alignment"] <= 5  # s x its share
        by_hand = ((r["videoalign.overall"] + 3) / 6 + 0.5 * (r["videoscore2.overall"] - 1) / 4) / 1.5
        assert r["overall"] == pytest.approx(by_hand, abs=1e-6)


def test_loop_trains_on_the_vlm_rewards(cli, tmp_path):
    """``vpotool loop --reward videoalign:1.0,videoscore2:0.5 --reward-device cpu`` on tiny weights: one round samples,
    scores with both, pairs and trains."""
    from test_loop import LOOP

    va, va_options = save_tiny_reward("videoalign", tmp_path)
    vs2, vs2_options = save_tiny_reward("videoscore2", tmp_path)
    run = tmp_path / "loop"
    code, _, err = cli(
        "loop", "--out", run, "--iterations", 1, "--eval-prompts", "none",
        "--reward", "videoalign:1.0,videoscore2:0.5",
        "--reward-path", f"videoalign={va},videoscore2={vs2}", "--reward-options", f"{va_options},{vs2_options}",
        "--reward-device", "cpu", *LOOP,
    )  # fmt: skip
    assert code == 0, err
    scores = read_manifest(run / "iter-0000" / "scores.parquet", "scores").to_pylist()
    assert len(scores) == 4 and all(math.isfinite(r["videoscore2.overall"]) for r in scores)
    assert (run / "checkpoints" / "step-2").is_dir()


@pytest.mark.parametrize("name", ["clip", "videoscore", "raft"])
def test_missing_weights_give_one_line(cli, samples, tmp_path, name):
    out = tmp_path / "scores.parquet"
    code, _, err = cli("score", "--samples", samples, "--reward", name, "--reward-path", tmp_path / "no", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--reward-path" in err, err
    assert not out.exists()


def test_incompatible_checkpoint_gives_one_line(cli, samples, tmp_path):
    clip, _ = save_tiny_reward("clip", tmp_path)  # a CLIP folder is not a VideoScore checkpoint
    out = tmp_path / "scores.parquet"
    code, _, err = cli("score", "--samples", samples, "--reward", "videoscore", "--reward-path", clip, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_eval_with_a_model_reward(cli, tmp_path):
    path, _ = save_tiny_reward("clip", tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    code, _, err = cli(
        "eval", "--prompts", prompts, "--reward", "clip,flicker", "--reward-path", path, "--out", tmp_path / "ev",
        "--frames", 5, "--height", 16, "--width", 16, "--steps", 2, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    metrics = {r["metric"] for r in read_manifest(tmp_path / "ev" / "eval.parquet", "eval").to_pylist()}
    assert {"clip.clip_score", "clip.overall", "flicker.overall"} <= metrics


def test_train_refl_on_a_model_reward_changes_the_adapter(cli, tmp_path):
    from safetensors.torch import load_file

    path, _ = save_tiny_reward("clip", tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    out = tmp_path / "refl"
    code, _, err = cli(
        "train-refl", "--prompts", prompts, "--reward", "clip", "--reward-path", path, "--out", out,
        "--max-steps", 2, "--batch-size", 2, "--lr", 1e-2, "--lora-rank", 4, "--save-every", 1,
        "--frames", 5, "--height", 16, "--width", 16, "--steps", 2, "--guidance", 1.0, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    files = sorted(out.glob("checkpoints/step-*/*lora*.safetensors"))
    assert len(files) == 2, files
    first, last = load_file(files[0]), load_file(files[-1])
    assert any(not (first[k] == last[k]).all() for k in first)
    metrics = read_manifest(out / "metrics.parquet", "metrics").to_pylist()
    assert len(metrics) == 2 and all(math.isfinite(r["reward"]) for r in metrics)


def test_dtype_auto_is_float32_on_a_cpu_and_upstreams_on_a_gpu(cli, samples, tmp_path):
    import torch

    from vpotool.rewards import resolve_dtype

    assert resolve_dtype("auto", "videoalign", "cpu") == torch.float32
    assert resolve_dtype("auto", "videoalign", "cuda:1") == torch.bfloat16  # upstream's GPU dtype
    assert resolve_dtype("auto", "unifiedreward-think", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "videoscore2", "cuda") == torch.float32  # vs2_inference.py loads float32
    assert resolve_dtype("float16", "videoalign", "cpu") == torch.float16  # a named dtype is taken as it is
    out = tmp_path / "scores.parquet"
    code, _, err = cli("score", "--samples", samples, "--reward", "temporal", "--out", out, "--dtype", "fp8")
    assert code == 2 and "dtype" in err and "auto" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
