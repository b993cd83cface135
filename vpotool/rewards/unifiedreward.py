"""``unifiedreward-think``: a pairwise video judge. UnifiedReward-Think (CodeGoat24/UnifiedReward-Think-qwen-7b, a
Qwen2.5-VL-7B) is shown a caption and two videos generated from it, reasons inside ``<think>``, then answers
"Video 1 is better" or "Video 2 is better".

Judging as upstream's ``inference_qwen/video_generation/qwen_infer_cot_video_generation.py`` (github
CodeGoat24/UnifiedReward, the UnifiedReward-Think folder):

- one user turn: the first video, the second video, then the instruction text with the caption in place of
  ``{prompt}``, rendered with the checkpoint's chat template and the generation prompt;
- each video read by qwen-vl-utils (0.0.14) at its defaults, each on its own: 2 frames a second of the video's own
  frame rate (at least 4, an even count), resized within qwen-vl-utils' pixel budget per frame; both videos'
  patches in one ``pixel_values_videos`` (the same preprocessing as :mod:`vpotool.rewards.videoscore2`, and the
  same ``mm_token_type_ids`` where the installed transformers reads them);
  ``second_per_grid_ts`` = temporal patch size / the rate of the frames kept (frames kept / frames x the video's
  fps), the rate qwen-vl-utils returns and upstream hands to the processor;
- ``generate`` with the checkpoint's generation config and ``max_new_tokens`` 1024, as upstream: sampling as that
  config says unless ``temperature`` is given (0: greedy, for labels that repeat; above 0: sampled at it);
- the verdict read as upstream's benchmark scripts read it: "Video 1 is better" anywhere in the answer is video 1,
  else "Video 2 is better" is video 2, else none (upstream counts that as a tie).

The instruction text is not part of the checkpoint and vpotool carries no copy: it is read from upstream's script
(``prompt_template=PATH``), from a model card (``README.md`` in the checkpoint folder) that shows the same call,
or from a text file holding the instruction with ``{prompt}``.
"""

from __future__ import annotations

import ast
import os
import re

import torch

from vpotool.errors import VpoError
from vpotool.rewards.videoalign import VIDEO_TOKEN
from vpotool.rewards.videoscore2 import check_qwen25_vl, load_qwen25_vl, qwen_video, takes_token_types, text_inputs

NAME = "unifiedreward-think"
DEFAULT_ID = "CodeGoat24/UnifiedReward-Think-qwen-7b"
WHAT = "a UnifiedReward-Think checkpoint folder (CodeGoat24/UnifiedReward-Think-qwen-7b, a Qwen2.5-VL)"
VERDICTS = ("Video 1 is better", "Video 2 is better")
# the instruction in upstream's script or a model card: the text item of the message, an f-string with {prompt}
SCRIPT_TEXT = re.compile(r'"type":\s*"text",\s*"text":\s*f("(?:[^"\\\n]|\\.)*\{prompt\}(?:[^"\\\n]|\\.)*")')
DEFAULTS = {"fps": 2.0, "max_new_tokens": 1024, "temperature": None, "prompt_template": None}


def parse_verdict(text: str) -> int | None:
    """1 or 2 for the video the answer prefers, as upstream's benchmark scripts read it; None when it names none."""
    for i, verdict in enumerate(VERDICTS, 1):
        if verdict in text:
            return i
    return None


def read_instruction(path: str) -> str:
    """The instruction text with ``{prompt}``: the f-string of the text item in upstream's script or a model card
    showing it, or a text file's whole content."""
    if not os.path.isfile(path):
        raise VpoError(
            f"judge {NAME}: instruction text not found at {path}; pass --judge-options prompt_template=PATH to "
            "qwen_infer_cot_video_generation.py (github CodeGoat24/UnifiedReward, UnifiedReward-Think/inference_qwen/"
            "video_generation) or a text file holding it with {prompt}"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = SCRIPT_TEXT.search(text)
    text = ast.literal_eval(found.group(1)) if found else text
    if "{prompt}" not in text:
        raise VpoError(f"judge {NAME}: {path} holds neither upstream's call nor an instruction text with {{prompt}}")
    return text


class UnifiedRewardThink:
    """Compares two videos of one caption: :meth:`judge` -> (1, 2 or None, the answer text).

    Videos are float ``[T, 3, H, W]`` in [0, 1] at ``fps`` frames a second."""

    name = NAME

    def __init__(self, model, tokenizer, chat_template: str, instruction: str, setup: dict):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.instruction, self.setup = instruction, setup
        self.device = next(model.parameters()).device
        self.token_types = takes_token_types(model)

    def query(self, prompt: str) -> str:
        """The chat text upstream renders for ``prompt``, with two video placeholders."""
        content = [
            {"type": "video", "video": "video 1"},
            {"type": "video", "video": "video 2"},
            {"type": "text", "text": self.instruction.replace("{prompt}", prompt)},
        ]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip

    def pixels(self, video: torch.Tensor, fps: float | None) -> tuple[torch.Tensor, list[int], list[int]]:
        """One video -> its patches ``[t * h * w, D]``, grid ``[t, h, w]`` and the frame indices kept."""
        return qwen_video(video, fps, self.setup, f"judge {NAME}")

    def inputs(self, first: torch.Tensor, second: torch.Tensor, prompt: str, fps=(None, None)) -> dict:
        """``generate``'s inputs for one comparison, as upstream's processor makes them; ``fps`` holds each video's
        frame rate (None: taken to be the sampling rate)."""
        s = self.setup
        rates = [r or s["fps"] for r in fps]
        videos = [self.pixels(v.to(self.device), r) for v, r in zip((first, second), rates, strict=True)]
        parts = self.query(prompt).split(VIDEO_TOKEN)
        if len(parts) != 3:
            raise VpoError(f"judge {NAME}: the chat template renders {len(parts) - 1} video placeholders, not 2")
        counts = [g[0] * g[1] * g[2] // s["merge"] ** 2 for _, g, _ in videos]
        text = parts[0] + VIDEO_TOKEN * counts[0] + parts[1] + VIDEO_TOKEN * counts[1] + parts[2]
        # the rate of the frames kept, as qwen-vl-utils returns it: kept / total x the video's frame rate
        kept_rates = [len(v[2]) / x.shape[0] * r for x, v, r in zip((first, second), videos, rates, strict=True)]
        return dict(
            **text_inputs(self.tokenizer, text, self.device, self.token_types),
            pixel_values_videos=torch.cat([p for p, _, _ in videos]).to(self.model.dtype),
            video_grid_thw=torch.tensor([g for _, g, _ in videos], device=self.device),
            second_per_grid_ts=torch.tensor([s["temporal"] / r for r in kept_rates], device=self.device),
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, first: torch.Tensor, second: torch.Tensor, prompt: str, fps=(None, None)) -> list[int]:
        """The generated token ids for one comparison."""
        s = self.setup
        inputs = self.inputs(first, second, prompt, fps)
        if s["temperature"] is None:  # the checkpoint's generation config decides, as upstream
            sample = {}
        elif s["temperature"] > 0:
            sample = {"do_sample": True, "temperature": s["temperature"]}
        else:
            sample = {"do_sample": False}
        out = self.model.generate(**inputs, max_new_tokens=s["max_new_tokens"], **sample)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def judge(self, first: torch.Tensor, second: torch.Tensor, prompt: str, fps=(None, None)):
        """``(verdict, answer)``: 1 when the answer prefers ``first``, 2 ``second``, None when it names neither;
        ``fps`` holds the two videos' frame rates."""
        ids = self.generate(first, second, prompt, fps)
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return parse_verdict(text), text


def load_unifiedreward_think(path: str | None = None, device="cpu", dtype=torch.float32, **options):
    """The ``unifiedreward-think`` judge from a UnifiedReward-Think folder (see the module docstring).

    Options: ``fps`` (frames sampled a second, default 2), ``max_new_tokens`` (default 1024), ``temperature``
    (default: the checkpoint's generation config, as upstream; 0: greedy), ``prompt_template`` (upstream's script,
    a model card or a text file; default ``README.md`` in the folder).
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise VpoError(f"--judge-options: {NAME} has no option(s) {', '.join(unknown)}; its options: "
                       f"{', '.join(DEFAULTS)}")  # fmt: skip
    options = {**DEFAULTS, **options}
    check_qwen25_vl(path, f"judge {NAME}", "--judge-path", WHAT)
    instruction = read_instruction(str(options["prompt_template"] or os.path.join(str(path), "README.md")))
    model, tokenizer, chat_template, setup = load_qwen25_vl(path, DEFAULT_ID, f"judge {NAME}", WHAT, device, dtype)
    setup.update(fps=float(options["fps"]), max_new_tokens=int(options["max_new_tokens"]),
                 temperature=None if options["temperature"] is None else float(options["temperature"]))  # fmt: skip
    return UnifiedRewardThink(model, tokenizer, chat_template, instruction, setup)


JUDGES = {NAME: load_unifiedreward_think}


def load_judge(name: str, path: str | None, device="cpu", dtype=torch.float32, options: dict | None = None):
    """A pairwise judge by name (``--judge``), from ``path`` (``--judge-path``) with ``options``."""
    from vpotool.options import check_declared
    from vpotool.rewards import JUDGE_OPTIONS, resolve_dtype

    if name not in JUDGES:
        raise VpoError(f"--judge {name}: unknown judge; known: {', '.join(JUDGES)}")
    options = check_declared("--judge-options", f"judge {name}", options or {}, JUDGE_OPTIONS[name])
    dtype = resolve_dtype(dtype, name, device)
    return JUDGES[name](path=path, device=device, dtype=dtype, **options)
