"""The ``unifiedreward-think`` pairwise judge against UnifiedReward-Think's own judging script (transformers 4.53.2,
qwen-vl-utils 0.0.14) on a tiny Qwen2.5-VL taught to name the brighter video, whose answers move with the videos'
positions (recorded by ``examples/unifiedreward/make_reference.py``; no UnifiedReward checkout is needed here), and
``vpotool label --judge`` followed by ``vpotool pair --labels``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from vpotool.errors import VpoError
from vpotool.manifest import read_manifest
from vpotool.rewards.unifiedreward import load_judge, parse_verdict, read_instruction

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "unifiedreward_answering"  # a tiny Qwen2.5-VL of UnifiedReward-Think-qwen-7b's architecture
RANDOM = DATA / "videoscore2_tiny"  # the same untaught, which never names a video
REF = load_file(str(DATA / "unifiedreward_reference.safetensors"))
META = json.loads((DATA / "unifiedreward_reference.json").read_text())
NEW_TOKENS = 120  # as the reference was generated


@pytest.fixture(scope="module")
def instruction(tmp_path_factory) -> str:
    """Upstream's instruction as recorded, in a script-like file: the message's text item as an f-string."""
    text = META["runs"][0]["query"].rsplit("<|vision_end|>", 1)[1].rsplit("<|im_end|>\n<|im_start|>assistant", 1)[0]
    path = tmp_path_factory.mktemp("ur") / "infer.py"
    item = json.dumps(text.replace(META["prompt"], "{prompt}"))
    path.write_text(f'messages = [{{"content": [{{"type": "text", "text": f{item}}}]}}]\n')
    return str(path)


@pytest.fixture(scope="module")
def judge(instruction):
    return load_judge("unifiedreward-think", str(FOLDER), options={"prompt_template": instruction,
                                                                   "max_new_tokens": NEW_TOKENS})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real samples run: 1 prompt x 3 candidates of the tiny model (FAST settings), made through the CLI."""
    from vpotool.cli import main

    folder = tmp_path_factory.mktemp("judge")
    (folder / "prompts.txt").write_text("a red circle moving left\n")
    argv = ["vpotool", "sample", "--prompts", folder / "prompts.txt", "--candidates", 3, "--out", folder, *FAST]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:
        mp.setattr(sys, "argv", [str(a) for a in argv])
        main()
    assert exit_.value.code == 0
    return folder


def video(i: int) -> torch.Tensor:
    return REF[f"frames_{i}"].permute(0, 3, 1, 2).float() / 255


def step_logits(judge, inputs: dict) -> torch.Tensor:
    """The processed logits of each step of ``judge``'s greedy answer to ``inputs``, ``[new tokens, vocab]``."""
    with torch.no_grad():
        out = judge.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)  # fmt: skip
    return torch.cat(out.scores)


@pytest.mark.parametrize("run", [0, 1])
def test_inputs_and_greedy_answer_match_upstream_in_both_orders(judge, run):
    """Query text, token ids, frames kept, pixels, grids, time steps, the generated ids, the logits of every step
    and the verdict of upstream's script, with the two videos (28 frames at 8 fps; 9 at 4 fps, darker) shown in
    each order: the brighter one wins in both, there as here."""
    info = META["runs"][run]
    first, second = info["order"]
    fps = (META[f"fps_{first}"], META[f"fps_{second}"])
    assert judge.query(META["prompt"]) == info["query"]
    for i, kept in zip((first, second), info["frame_indices"], strict=True):
        assert judge.pixels(video(i), META[f"fps_{i}"])[2] == kept
    inputs = judge.inputs(video(first), video(second), META["prompt"], fps)
    assert inputs["input_ids"][0].tolist() == REF[f"input_ids_{run}"].tolist()
    assert inputs["video_grid_thw"].tolist() == info["grid_thw"]
    torch.testing.assert_close(inputs["second_per_grid_ts"].tolist(), info["second_per_grid_ts"], atol=1e-6, rtol=0)
    pixels = inputs["pixel_values_videos"]
    torch.testing.assert_close(pixels[:8], REF[f"pixel_values_head_{run}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels.double().sum(1), REF[f"pixel_values_sum_{run}"], atol=2e-3, rtol=0)
    ids = judge.generate(video(first), video(second), META["prompt"], fps)
    assert ids == REF[f"generated_{run}"].tolist()
    torch.testing.assert_close(step_logits(judge, inputs), REF[f"step_logits_{run}"], atol=1e-4, rtol=0)
    verdict, text = judge.judge(video(first), video(second), META["prompt"], fps)
    assert text == info["output_text"] and verdict == parse_verdict(info["output_text"]) == (1, 2)[run]
    if judge.token_types:  # transformers 5: the processor's token types, 2 on both videos' tokens
        types = inputs["mm_token_type_ids"][0].tolist()
        assert types == [2 if t == judge.model.config.video_token_id else 0 for t in inputs["input_ids"][0].tolist()]


def test_dropped_positions_or_shuffled_frames_change_the_verdict(judge, monkeypatch):
    """The check can fail: the frames of the first video shuffled move the logits far beyond the tolerance above;
    without ``mm_token_type_ids`` (transformers 5 then gives the videos 1-D positions) the answer loses its format
    and the verdict is gone, as with UnifiedReward-Think itself."""
    fps = (META["fps_0"], META["fps_1"])
    shuffled = video(0)[torch.randperm(video(0).shape[0], generator=torch.Generator().manual_seed(0))]
    logits = step_logits(judge, judge.inputs(shuffled, video(1), META["prompt"], fps))
    assert (logits[0] - REF["step_logits_0"][0]).abs().max() > 1e-2
    if not judge.token_types:
        pytest.skip("this transformers' Qwen2.5-VL finds the video tokens itself; there is no token type to drop")
    monkeypatch.setattr(judge, "token_types", False)
    verdict, text = judge.judge(video(0), video(1), META["prompt"], fps)
    assert text != META["runs"][0]["output_text"] and verdict is None


def test_decoding_follows_the_checkpoints_generation_config_unless_a_temperature_is_given(judge, monkeypatch):
    """As upstream, ``generate`` gets no sampling settings, so the checkpoint's ``generation_config.json`` decides
    (here greedy with a repetition penalty of 1.05); ``temperature=0`` forces greedy, above 0 samples at it."""
    seen = []
    monkeypatch.setattr(judge.model, "generate", lambda **kw: seen.append(kw) or kw["input_ids"])
    fps = (META["fps_0"], META["fps_1"])
    for temperature in (None, 0.0, 0.7):
        monkeypatch.setitem(judge.setup, "temperature", temperature)
        judge.generate(video(0), video(1), META["prompt"], fps)
    assert [{k: v for k, v in kw.items() if k in ("do_sample", "temperature")} for kw in seen] == [
        {}, {"do_sample": False}, {"do_sample": True, "temperature": 0.7}
    ]  # fmt: skip
    assert judge.model.generation_config.repetition_penalty == 1.05


def test_verdict_is_read_as_upstream_reads_it():
    assert parse_verdict("<think>...</think>\n<answer>Video 2 is better</answer>") == 2
    assert parse_verdict("<answer>Video 1 is better</answer>") == 1
    assert parse_verdict("Video 2 is better, though Video 1 is better lit") == 1  # upstream checks video 1 first
    assert parse_verdict("<answer>video 2 is better</answer>") is None  # case matters upstream
    assert parse_verdict("") is None


def test_instruction_sources_and_bad_judge_input(instruction, judge, tmp_path):
    text = read_instruction(instruction)
    assert text.startswith("Given a caption and two videos") and text.endswith("[{prompt}]") and "\n" in text
    plain = tmp_path / "plain.txt"
    plain.write_text("Which is better? {prompt}")
    assert read_instruction(str(plain)) == "Which is better? {prompt}"
    plain.write_text("no placeholder")
    with pytest.raises(VpoError, match="neither upstream's call nor an instruction text"):
        read_instruction(str(plain))
    with pytest.raises(VpoError, match="instruction text not found.*prompt_template=PATH"):
        load_judge("unifiedreward-think", str(FOLDER))  # the tiny folder has no model card
    with pytest.raises(VpoError, match="unknown judge; known: unifiedreward-think"):
        load_judge("gpt-judge", str(FOLDER))
    with pytest.raises(VpoError, match="has no option.*temprature"):
        load_judge("unifiedreward-think", str(FOLDER), options={"temprature": 0.7})
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(VpoError, match="holds a clip model, not a UnifiedReward-Think"):
        load_judge("unifiedreward-think", str(tmp_path / "clip"), options={"prompt_template": instruction})
    with pytest.raises(VpoError, match="needs --judge-path"):
        load_judge("unifiedreward-think", None)
    with pytest.raises(VpoError, match="a video of 1 frames gives 0 frames.*pass longer videos"):
        judge.judge(video(0)[:1], video(1), META["prompt"], (8, 4))


class ScriptedJudge:
    """A judge whose answers are given: ``rule`` maps the two videos' mean brightness to (verdict, answer)."""

    name = "unifiedreward-think"

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def judge(self, first, second, prompt, fps):
        self.calls.append((first.mean().item(), second.mean().item()))
        return self.rule(first.mean().item(), second.mean().item())


def test_label_judge_both_orders_then_pair_labels(tiny_run, cli, tmp_path):
    """``label --judge`` judges each pair in both orders into labels rows (its answer kept); orders that agree give
    a pair of margin 1, orders that disagree (position bias) none, and ``pair --labels`` reads them unchanged."""
    from vpotool.config import LabelConfig, PairConfig
    from vpotool.report.judge import run_judge
    from vpotool.stages.pair import run_pair

    samples = tiny_run / "samples.parquet"
    brighter = ScriptedJudge(lambda a, b: (1 if a > b else 2, f"<answer>Video {1 if a > b else 2} is better</answer>"))
    cfg = LabelConfig(samples=str(samples), out=str(tmp_path / "labels.parquet"), judge="unifiedreward-think")
    run_judge(cfg, judge=brighter)
    rows = read_manifest(tmp_path / "labels.parquet", "labels").to_pylist()
    n_pairs = len(rows) // 2
    assert n_pairs >= 1 and len(brighter.calls) == 2 * n_pairs
    assert {r["labeler"] for r in rows} == {"unifiedreward-think"} and {r["note"] for r in rows} == {"agree"}
    assert all(r["text"].startswith("<answer>Video") for r in rows)
    pairs = run_pair(PairConfig(samples=str(samples), labels=str(tmp_path / "labels.parquet"),
                                out=str(tmp_path / "pairs.parquet")))  # fmt: skip
    got = read_manifest(pairs, "pairs").to_pylist()
    assert len(got) == n_pairs and all(p["margin"] == 1.0 and p["source"] == "judge" for p in got)
    # rerun: resumes, judges nothing again
    run_judge(cfg, judge=brighter)
    assert len(brighter.calls) == 2 * n_pairs
    # a judge that always prefers the video shown first: every pair disagrees, no preference survives
    first = ScriptedJudge(lambda a, b: (1, "Video 1 is better"))
    out = tmp_path / "first.parquet"
    run_judge(LabelConfig(samples=str(samples), out=str(out), judge="unifiedreward-think"), judge=first)
    assert {r["note"] for r in read_manifest(out, "labels").to_pylist()} == {"disagree"}
    code, _, err = cli("pair", "--samples", str(samples), "--labels", str(out), "--out", str(tmp_path / "p2.parquet"))
    assert code == 2 and "no answer preferring one video" in err


def brightened(run: Path, out: Path) -> Path:
    """A copy of ``run``'s samples whose candidates are made clearly darker or brighter (x 0.3, 1, 1.8), as the
    tiny judge learned to tell them apart; returns its samples manifest."""
    from vpotool.manifest import write_manifest
    from vpotool.video import read_video, write_video

    rows = read_manifest(run / "samples.parquet", "samples").to_pylist()
    (out / "videos").mkdir(parents=True)
    for row in rows:
        frames = read_video(run / row["video"]).astype("float32") * (0.3, 1.0, 1.8)[row["candidate"]]
        write_video(out / row["video"], frames.clip(0, 255).astype("uint8"), row["fps"])
    write_manifest(out / "samples.parquet", rows, "samples")
    return out / "samples.parquet"


def test_label_judge_then_pair_from_the_command_line(tiny_run, cli, tmp_path):
    """``label --judge`` then ``pair --labels`` from the command line on a tiny judge taught to prefer the brighter
    video (``examples/tiny_judges/train.py``): its verdicts, read from its own generated answers, agree in both
    orders, and each pair's chosen video is the brighter one."""
    from tiny_rewards import save_tiny_reward

    from vpotool.video import read_video

    path, options = save_tiny_reward("unifiedreward-think", tmp_path)
    samples, out = brightened(tiny_run, tmp_path / "run"), tmp_path / "labels.parquet"
    code, _, err = cli("label", "--samples", samples, "--out", out, "--judge", "unifiedreward-think", "--judge-path",
                       path, "--judge-options", options, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    rows = read_manifest(out, "labels").to_pylist()
    assert len(rows) == 6 and all("</answer>" in r["text"] for r in rows)  # 3 pairs x 2 orders
    code, _, err = cli("pair", "--samples", samples, "--labels", out, "--out", tmp_path / "pairs.parquet")
    assert code == 0, err
    pairs = read_manifest(tmp_path / "pairs.parquet", "pairs").to_pylist()
    agreed = [r for r in rows if r["note"] == "agree"]
    assert len(pairs) == len(agreed) // 2 >= 2
    for p in pairs:
        chosen, rejected = (read_video(out.parent / p[f"{side}_video"]).mean() for side in ("chosen", "rejected"))
        assert chosen > rejected


def test_label_judge_command_on_tiny_weights(tiny_run, cli, instruction, tmp_path):
    """From the command line on the tiny random judge (which never names a video): every answer is a tie, the
    count is printed, and the labels hold the answers; a resume under another judge setting is refused."""
    samples = tiny_run / "samples.parquet"
    out = tmp_path / "labels.parquet"
    flags = ["--samples", str(samples), "--out", str(out), "--judge", "unifiedreward-think", "--judge-path",
             str(RANDOM), "--device", "cpu"]  # fmt: skip
    options = f"max_new_tokens=4,prompt_template={instruction}"
    code, _, err = cli("label", *flags, "--judge-options", options)
    assert code == 0, err
    rows = read_manifest(out, "labels").to_pylist()
    assert rows and {r["choice"] for r in rows} == {"tie"} and {r["note"] for r in rows} == {"no verdict"}
    assert f"{len(rows)} of {len(rows)} answers named neither video" in " ".join(err.split())
    code, _, err = cli("label", *flags, "--judge-options", options.replace("=4", "=8"))
    assert code == 2 and "judge_options" in err and len(err.strip().splitlines()) == 1
