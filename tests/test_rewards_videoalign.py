"""``videoalign`` against VideoAlign's own inference on a tiny random VideoReward (recorded by
``examples/videoalign/make_reference.py``; no VideoAlign checkout is needed here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpotool.errors import VpoError
from vpotool.rewards import load_reward
from vpotool.rewards.videoalign import frame_indices, sample_count, smart_resize

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "videoalign_tiny"
REF = load_file(str(DATA / "videoalign_reference.safetensors"))
META = json.loads((DATA / "videoalign_reference.json").read_text())
TOL = 1e-5  # absolute, on heads of 0.03 to 1.4 (measured: 1.3e-6); float32 on both sides


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """Upstream's prompt text as recorded (the recorded query of video 0 with its prompt made the placeholder)."""
    text = META["texts"][0]
    body = text.split("<|vision_end|>", 1)[1].rsplit("<|im_end|>\n<|im_start|>assistant\n", 1)[0]
    path = tmp_path_factory.mktemp("va") / "template.txt"
    path.write_text(body.replace(META["prompts"][0], "{text_prompt}"))
    return str(path)


@pytest.fixture(scope="module")
def reward(template):
    return load_reward("videoalign", str(FOLDER), options={"videoalign": {"prompt_template": template}})


def video(i: int) -> torch.Tensor:
    """The frames upstream decoded, float ``[1, T, 3, H, W]`` in [0, 1]."""
    return (REF[f"frames_{i}"].permute(0, 3, 1, 2).float() / 255).unsqueeze(0)


def test_frame_picking_and_size_match_upstream():
    for i, info in enumerate(META["videos"]):
        t, h, w = REF[f"frames_{i}"].shape[:3]
        n = sample_count(t, info["fps"], 2.0)
        assert frame_indices(t, n).tolist() == META["frame_indices"][i]
        assert list(smart_resize(h, w, 128 * 28 * 28, 8000)) == info["size"]
    assert smart_resize(480, 720, 128 * 28 * 28, 200704) == (364, 532)  # by hand: beta = 1.3115, floored to 28s
    assert sample_count(81, 16, 2.0) == 10 and sample_count(3, 24, 2.0) == 2  # 10.1 -> 10; at least 4, at most T


def test_query_and_pixels_match_upstream(reward):
    for i, prompt in enumerate(META["prompts"]):
        assert reward.query(prompt) == META["texts"][i]
        pixels, grid = reward.pixels(video(i), META["videos"][i]["fps"])
        assert grid == META["videos"][i]["grid_thw"]
        ids, _ = reward.tokens([prompt], grid[0] * grid[1] * grid[2] // 4)
        assert ids[0].tolist() == REF[f"input_ids_{i}"].tolist()
        torch.testing.assert_close(pixels[:8], REF[f"pixel_values_head_{i}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels.double().sum(1), REF[f"pixel_values_sum_{i}"], atol=2e-3, rtol=0)


def test_rewards_match_upstream(reward, template):
    raw = load_reward("videoalign", str(FOLDER), options={"videoalign": {"prompt_template": template, "norm": False}})
    for i, prompt in enumerate(META["prompts"]):
        fps = META["videos"][i]["fps"]
        for scorer, kind in ((raw, "raw"), (reward, "norm")):
            out = scorer(video(i), [prompt], fps=fps)
            got = torch.stack([out["visual_quality"], out["motion_quality"], out["text_alignment"], out["overall"]])
            want = torch.stack([REF[f"{kind}_{k}"][i] for k in ("VQ", "MQ", "TA", "Overall")]).float()
            torch.testing.assert_close(got[:, 0], want, atol=TOL, rtol=0)


def test_head_weights_and_gradients(template):
    scorer = load_reward(
        "videoalign", str(FOLDER), options={"videoalign": {"prompt_template": template, "vq": 0, "mq": 2, "ta": 0.5}}
    )
    frames = video(0).repeat(2, 1, 1, 1, 1).requires_grad_(True)
    out = scorer(frames, ["a red ball rolls to the left", "x"], fps=8)
    torch.testing.assert_close(out["overall"], 2 * out["motion_quality"] + 0.5 * out["text_alignment"])
    assert out["overall"][0] != out["overall"][1]  # the prompt counts; padding the shorter one changes nothing else
    out["overall"].sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


def test_bad_inputs(tmp_path, template, reward):
    opts = {"videoalign": {"prompt_template": template}}
    other = tmp_path / "other"
    shutil.copytree(FOLDER / "base", other)  # a plain Qwen2-VL folder: no model_config.json
    with pytest.raises(VpoError, match="no model_config.json"):
        load_reward("videoalign", str(other), options=opts)
    with pytest.raises(VpoError, match="videoalign needs --reward-path: a VideoReward checkpoint folder"):
        load_reward("videoalign", None, options=opts)  # no "no model_config.json in None"
    headless = tmp_path / "headless"
    shutil.copytree(FOLDER, headless)
    sd = torch.load(headless / "checkpoint-3" / "non_lora_state_dict.pth", weights_only=True)
    torch.save(
        {k: v for k, v in sd.items() if "rm_head" not in k}, headless / "checkpoint-3" / "non_lora_state_dict.pth"
    )
    with pytest.raises(VpoError, match="no reward head"):
        load_reward("videoalign", str(headless), options=opts)
    with pytest.raises(VpoError, match="at least 2"):
        reward(video(0)[:, :1], ["a"], fps=8)
    with pytest.raises(VpoError, match="prompt text not found"):
        load_reward("videoalign", str(FOLDER))


def test_a_checkpoint_without_head_statistics_is_not_left_unnormalised(tmp_path, template):
    """Upstream normalises each head by the checkpoint's inference_config; without it the heads are refused in one
    line (or read raw when asked for)."""
    bare = tmp_path / "bare"
    shutil.copytree(FOLDER, bare)
    config = json.loads((bare / "model_config.json").read_text())
    config.pop("inference_config", None)
    (bare / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(VpoError, match="records no head statistics.*videoalign.norm=false"):
        load_reward("videoalign", str(bare), options={"videoalign": {"prompt_template": template}})
    raw = load_reward("videoalign", str(bare), options={"videoalign": {"prompt_template": template, "norm": False}})
    assert raw.setup["norm"] is False
