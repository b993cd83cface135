"""``videoscore2`` against VideoScore2's own inference (transformers 4.53.2, qwen-vl-utils 0.0.14) on a tiny
Qwen2.5-VL taught to answer in its format, whose answers and soft scores move with the video's positions (recorded
by ``examples/videoscore2/make_reference.py --model tests/data/videoscore2_answering``; no VideoScore2 checkout is
needed here)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpotool.errors import VpoError
from vpotool.rewards import load_reward
from vpotool.rewards.videoscore2 import frame_size, parse_answer, read_scores, sample_count, soft_score, text_inputs
from vpotool.stages.score import score_rows

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "videoscore2_answering"
REF = load_file(str(DATA / "videoscore2_reference.safetensors"))
META = json.loads((DATA / "videoscore2_reference.json").read_text())
NEW_TOKENS = 200  # as the reference was generated


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """Upstream's prompt text as recorded (the recorded query of video 0 with its prompt made the placeholder)."""
    text = META["videos"][0]["query"]
    body = text.split("<|vision_end|>", 1)[1].rsplit("<|im_end|>\n<|im_start|>assistant\n", 1)[0]
    path = tmp_path_factory.mktemp("vs2") / "template.txt"
    path.write_text(body.replace(META["prompts"][0], "$t2v_prompt"))
    return str(path)


@pytest.fixture(scope="module")
def reward(template):
    options = {"videoscore2": {"prompt_template": template, "max_new_tokens": NEW_TOKENS}}
    return load_reward("videoscore2", str(FOLDER), options=options)


def video(i: int) -> torch.Tensor:
    """The frames upstream decoded, float ``[T, 3, H, W]`` in [0, 1]."""
    return REF[f"frames_{i}"].permute(0, 3, 1, 2).float() / 255


def test_frame_count_and_size_match_upstream():
    for i, info in enumerate(META["videos"]):
        t, h, w = REF[f"frames_{i}"].shape[:3]
        n = sample_count(t, info["fps"], 2.0)
        assert n == len(info["frame_indices"])
        assert list(frame_size(h, w, n)) == info["size"]
    assert sample_count(28, 8, 2.0) == 6  # 7 floored to even (rounding would give 8)
    assert sample_count(3, 24, 2.0) == 2 and sample_count(81, 16, 2.0) == 10  # at least 4, at most T
    assert frame_size(480, 832, 10) == (476, 840)  # by hand: sides rounded to 28s, 399840 pixels within budget
    assert frame_size(720, 1280, 10) == (560, 1008)  # over 768 * 784 pixels: beta = 1.2372, sides floored to 28s


def test_query_ids_and_pixels_match_upstream(reward):
    for i, prompt in enumerate(META["prompts"]):
        info = META["videos"][i]
        assert reward.query(prompt) == info["query"]
        pixels, grid, index = reward.pixels(video(i), info["fps"])
        assert grid == info["grid_thw"] and index == info["frame_indices"]
        torch.testing.assert_close(pixels[:8], REF[f"pixel_values_head_{i}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels.double().sum(1), REF[f"pixel_values_sum_{i}"], atol=2e-3, rtol=0)
        n_video = grid[0] * grid[1] * grid[2] // 4
        ids = reward.tokenizer(info["query"].replace("<|video_pad|>", "<|video_pad|>" * n_video))
        assert ids["input_ids"] == REF[f"input_ids_{i}"].tolist()
        inputs = reward.inputs(video(i), prompt, info["fps"])
        assert inputs["input_ids"][0].tolist() == ids["input_ids"]
        if reward.token_types:  # transformers 5: the processor's token types, 2 on the video's tokens
            types = inputs["mm_token_type_ids"][0].tolist()
            assert types == [2 if t == reward.model.config.video_token_id else 0 for t in ids["input_ids"]]
            assert types.count(2) == n_video


def test_token_types_as_the_processor_builds_them(reward):
    text = "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>a <|image_pad|>"
    got = text_inputs(reward.tokenizer, text, "cpu", True)
    assert got["mm_token_type_ids"].tolist() == [[0, 2, 2, 0, 0, 0, 1]] and got["input_ids"].shape == (1, 7)
    assert set(text_inputs(reward.tokenizer, text, "cpu", False)) == {"input_ids", "attention_mask"}


def test_answers_step_logits_and_soft_scores_match_upstream(reward, caplog):
    """Greedy answers, the processed logits of every step and the soft scores upstream computed; video 1 (noise,
    unlike what the tiny judge was taught on) loses the format there as here, so its scores are NaN."""
    for i, prompt in enumerate(META["prompts"]):
        info = META["videos"][i]
        ids, steps = reward.generate(video(i), prompt, info["fps"])
        assert ids == REF[f"generated_{i}"].tolist() and len(steps) == len(ids)
        torch.testing.assert_close(torch.stack(steps), REF[f"step_logits_{i}"], atol=1e-4, rtol=0)
        with caplog.at_level(logging.WARNING, logger="vpotool.rewards.videoscore2"):
            out = reward(video(i)[None], [prompt], fps=info["fps"])
        assert reward.last_texts == [info["output_text"]]  # upstream's answer text, kept
        want = [math.nan if v is None else v for v in info["scores"]]
        got = [out[d].item() for d in ("visual_quality", "text_alignment", "physical_consistency")]
        assert got == pytest.approx(want, abs=1e-6, nan_ok=True), (i, got, want)
    assert META["videos"][0]["scores"][0] is not None and META["videos"][1]["scores"] == [None, None, None]
    assert set(out) == set(reward.dimensions) and torch.isnan(out["overall"]).all()
    assert "1 of 1 answers hold no scores" in caplog.text


def test_dropped_positions_or_reversed_frames_change_the_scores(reward, monkeypatch):
    """The check can fail: without ``mm_token_type_ids`` (transformers 5 then gives the video 1-D positions) or with
    the frames in reverse order, the logits move far beyond the tolerance above and the soft scores change."""
    info = META["videos"][0]
    _, steps = reward.generate(video(0).flip(0), META["prompts"][0], info["fps"])
    assert (steps[0] - REF["step_logits_0"][0]).abs().max() > 1e-2
    if not reward.token_types:
        pytest.skip("this transformers' Qwen2.5-VL finds the video tokens itself; there is no token type to drop")
    monkeypatch.setattr(reward, "token_types", False)
    ids, steps = reward.generate(video(0), META["prompts"][0], info["fps"])
    assert (steps[0] - REF["step_logits_0"][0]).abs().max() > 0.1
    assert read_scores(ids, steps, reward.decode, reward.digit_ids) != info["scores"]


def test_score_stage_refuses_nan_in_one_line(reward):
    rows = [{"sample_id": "s0", "prompt_id": "p0", "prompt": META["prompts"][1], "fps": 4, "video": "v.mp4"}]
    with pytest.raises(VpoError, match="reward videoscore2 gave a non-finite .* for sample s0"):
        score_rows({"videoscore2": reward}, video(1).unsqueeze(0), rows)


def test_soft_scores_and_logits_match_upstream_on_a_teacher_forced_answer(reward):
    """A hand-written answer after video 0's query: upstream's logits of each of its tokens from a forward pass
    (no generation), and the soft scores upstream's functions read from them."""
    ids, steps = REF["answer_ids"].tolist(), list(REF["answer_logits"])
    assert reward.decode(ids) == META["answer"]
    assert read_scores(ids, steps, reward.decode, reward.digit_ids) == META["answer_scores"]
    inputs = reward.inputs(video(0), META["prompts"][0], META["videos"][0]["fps"])
    n = inputs["input_ids"].shape[1]
    query = inputs["input_ids"][0].tolist()
    full = text_inputs(reward.tokenizer, reward.decode(query + ids), "cpu", reward.token_types)
    assert full["input_ids"][0].tolist() == query + ids
    forward = {k: v for k, v in inputs.items() if k not in full}
    with torch.no_grad():
        logits = reward.model(**full, **forward).logits[0, n - 1 : -1]
    torch.testing.assert_close(logits, REF["answer_logits"], atol=1e-4, rtol=0)


def test_parser_and_soft_score_by_hand(reward):
    text = "The ball rolls.\nvisual quality: 4;\ntext-to-video alignment: 3,\nphysical/common-sense consistency: 5"
    assert parse_answer(text) == (4, 3, 5)
    assert parse_answer("Visual Quality: 2; Text-to-video alignment:1, physical/common-sense consistency:\n3") == (
        2,
        1,
        3,
    )
    assert parse_answer("visual quality: 4; text-to-video alignment: 3") is None
    assert (
        parse_answer("visual quality: four; text-to-video alignment: 3, physical/common-sense consistency: 5") is None
    )
    digits = [10, 11, 12, 13, 14]
    logits = torch.full((20,), -1e4)
    logits[digits] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0, 0.0])  # p("3") = 2/6 of the digits' mass
    assert soft_score(logits, digits) == round(3 * 2 / 6, 4)
    logits[0] = 50.0  # mass outside the digits does not count
    assert soft_score(logits, digits) == 1.0
    ids = reward.tokenizer.encode(text.replace("physical/common-sense consistency: 5", "done"))
    assert read_scores(ids, [torch.zeros(len(reward.tokenizer))] * len(ids), reward.decode, reward.digit_ids) is None


def test_bad_inputs(tmp_path, template, reward):
    opts = {"videoscore2": {"prompt_template": template}}
    other = tmp_path / "other"
    shutil.copytree(DATA / "videoalign_tiny" / "base", other)  # a Qwen2-VL, not a Qwen2.5-VL
    with pytest.raises(VpoError, match="holds a qwen2_vl model, not a VideoScore2"):
        load_reward("videoscore2", str(other), options=opts)
    with pytest.raises(VpoError, match="prompt text not found"):
        load_reward("videoscore2", str(FOLDER))
    with pytest.raises(VpoError, match="no VS2_QUERY_TEMPLATE"):
        load_reward(
            "videoscore2", str(FOLDER), options={"videoscore2": {"prompt_template": str(other / "vocab.json")}}
        )
    with pytest.raises(VpoError, match="unknown option"):
        load_reward("videoscore2", str(FOLDER), options={"videoscore2": {"frames": 4}})
    with pytest.raises(VpoError, match="needs at least 2"):
        reward(video(0)[None, :1], ["a"], fps=8)
