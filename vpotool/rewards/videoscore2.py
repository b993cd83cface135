"""``videoscore2``: TIGER-Lab's VideoScore2, a Qwen2.5-VL-7B judge that writes its reasoning, then scores visual
quality, text-to-video alignment and physical/common-sense consistency from 1 to 5.

Scoring as upstream's ``vs2_inference.py`` (github TIGER-AI-Lab/VideoScore2, also the model card's example):

- frames: qwen-vl-utils (0.0.14) at ``fps`` 2: ``T / video_fps * 2`` frames clamped to [4, T] and floored to an
  even count, spaced ``linspace(0, T - 1, n).round()``; each resized (bicubic, antialiased, rounded to 8 bits) to
  ``smart_resize`` with sides multiples of 28 and pixels within [128 * 784, max(min(768 * 784, 128000 * 784 * 0.9 /
  n * 2), 1.05 * 128 * 784)]; rescaled, normalised with the processor's mean/std and cut into Qwen2.5-VL patches;
  ``second_per_grid_ts`` is ``temporal_patch_size / 2`` (upstream passes ``fps=2`` to the processor);
- query: the chat template over one video placeholder and the prompt text with ``$t2v_prompt`` replaced; the
  token ids with ``mm_token_type_ids`` (2 on video tokens) where the installed transformers' Qwen2.5-VL reads them
  (5.x builds the 3-D video positions from them and falls back to 1-D positions silently without; 4.x finds the
  video tokens in the ids itself), as the processor gives them (:func:`text_inputs`);
- generation: ``generate`` with the checkpoint's generation config, ``max_new_tokens`` 1024, greedy unless
  ``temperature`` > 0 (upstream samples at 0.7; greedy makes the reward deterministic);
- scores: upstream's regex ``visual quality: N ... text-to-video alignment: N ... physical/common-sense
  consistency: N`` must match the answer; each dimension is then read from the probabilities of the score token,
  as upstream's ``ll_based_soft_score_normed``: at the first digit after the dimension's label, the processed
  logits' softmax over the tokens "1" to "5", the likeliest ``s`` times its share ``p_s / sum p`` (rounded to 4
  digits). ``overall`` is the mean of the three.

An answer without scores in that format gives NaN for that video (all four values) and a warning counting them; the
``score`` stage then refuses it in one line naming the sample. The generated texts of the last call are kept in
``last_texts``. The prompt text is not part of the checkpoint and vpotool carries no copy: it is read from the
model card (``README.md`` in the checkpoint folder) or ``prompt_template=PATH`` (upstream's ``vs2_inference.py``,
or a text file holding the template with ``$t2v_prompt``). Not differentiable (the scores come from sampling text).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from string import Template

import torch

from vpotool.errors import VpoError
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import check_options, load_pretrained, looks_local, read_json
from vpotool.rewards.videoalign import VIDEO_TOKEN, frame_indices, smart_resize, video_patches

log = logging.getLogger(__name__)
IMAGE_TOKEN = "<|image_pad|>"
DIMENSIONS = ("visual_quality", "text_alignment", "physical_consistency")
LABELS = ("visual quality:", "text-to-video alignment:", "physical/common-sense consistency:")
ANSWER = re.compile(
    r"visual quality:\s*(\d+).*?text-to-video alignment:\s*(\d+).*?physical/common-sense consistency:\s*(\d+)",
    re.DOTALL | re.IGNORECASE,
)
CARD_TEMPLATE = re.compile(r'VS2_QUERY_TEMPLATE\s*=\s*Template\(\s*"""(.*?)"""', re.DOTALL)
DEFAULT_ID = "TIGER-Lab/VideoScore2"
WHAT = "a VideoScore2 checkpoint folder (TIGER-Lab/VideoScore2, a Qwen2.5-VL)"
# qwen-vl-utils 0.0.14's video constants
FACTOR, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 28, 2, 4, 768
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, TOTAL_PIXELS = 128 * 28 * 28, 768 * 28 * 28, 128000 * 28 * 28 * 0.9
DEFAULTS = {"fps": 2.0, "max_new_tokens": 1024, "temperature": 0.0, "prompt_template": None}


def sample_count(total: int, video_fps: float | None, fps: float, name: str = "reward videoscore2") -> int:
    """How many of a video's ``total`` frames qwen-vl-utils 0.0.14 keeps: ``total / video_fps * fps`` clamped to
    [4, min(768, total)] and floored to an even count (without ``video_fps`` the frames are taken to be at ``fps``)."""
    lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(total / (video_fps or fps) * fps, lo), hi, total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise VpoError(
            f"{name}: a video of {total} frames gives {n} frames to look at; a Qwen2.5-VL video needs at least "
            f"{FRAME_FACTOR} (pass longer videos)"
        )
    return n


def frame_size(height: int, width: int, n: int) -> tuple[int, int]:
    """qwen-vl-utils' resized frame size for ``n`` frames of ``height`` x ``width``."""
    max_pixels = max(min(VIDEO_MAX_PIXELS, TOTAL_PIXELS / n * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05))
    return smart_resize(height, width, VIDEO_MIN_PIXELS, max_pixels)


def qwen_video(video: torch.Tensor, fps: float | None, setup: dict, name: str = "reward videoscore2"):
    """One video ``[T, 3, H, W]`` at ``fps`` as qwen-vl-utils and the Qwen2.5-VL processor read it at ``setup``'s
    sampling rate: the patches ``[t * h * w, D]``, the grid ``[t, h, w]`` and the frame indices kept."""
    total, _, height, width = video.shape
    n = sample_count(total, fps, setup["fps"], name)
    index = frame_indices(total, n)
    kept = video.index_select(0, index.to(video.device)).unsqueeze(0)
    patches, grid = video_patches(kept, frame_size(height, width, n), setup)
    return patches, grid, index.tolist()


def takes_token_types(model) -> bool:
    """Whether ``model``'s forward reads ``mm_token_type_ids`` (transformers 5's Qwen2.5-VL, which builds its 3-D
    video positions only from them)."""
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def text_inputs(tokenizer, text: str, device, token_types: bool) -> dict:
    """The token ids of ``text`` (video placeholders already repeated), its attention mask and, with
    ``token_types``, ``mm_token_type_ids`` as the transformers processor builds them: 1 on image tokens, 2 on video
    tokens, 0 elsewhere; each long ``[1, L]``."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if token_types:
        video, image = (tokenizer.convert_tokens_to_ids(t) for t in (VIDEO_TOKEN, IMAGE_TOKEN))
        out["mm_token_type_ids"] = torch.where(ids == video, 2, torch.where(ids == image, 1, 0))
    return out


def parse_answer(text: str) -> tuple[int, int, int] | None:
    """The three integer scores of an answer in upstream's format, or None when its regex does not match."""
    found = ANSWER.search(text)
    return tuple(int(g) for g in found.groups()) if found else None


def score_index(label: str, ids: list[int], decode) -> int:
    """The position in ``ids`` of the first digit after the first ``label`` of their text, -1 when none: the token
    whose decoded prefix ends exactly at that digit (upstream's ``find_score_token_index_by_prompt``)."""
    text = decode(ids)
    found = re.search(r"(?:\(\d+\)\s*|\n\s*)?" + re.escape(label), text, flags=re.IGNORECASE)
    digit = re.search(r"\d", text[found.end() :]) if found else None
    if digit is None:
        return -1
    target = text[: found.end() + digit.start() + 1]
    return next((i for i in range(len(ids)) if decode(ids[: i + 1]) == target), -1)


def soft_score(logits: torch.Tensor, digit_ids: list[int]) -> float:
    """The likeliest score ``s`` of 1..5 times its share of the five scores' probabilities, rounded to 4 digits.

    ``logits``: float ``[vocab]`` at the score token; ``digit_ids``: the token ids of "1" to "5"."""
    probs = [math.exp(v) for v in torch.log_softmax(logits, dim=-1)[digit_ids].tolist()]  # as upstream: float32 log
    best = max(range(len(probs)), key=lambda i: (probs[i], -i))
    return round((best + 1) * probs[best] / sum(probs), 4) if sum(probs) > 0 else 0.0


def read_scores(ids: list[int], steps: list[torch.Tensor], decode, digit_ids: list[int]) -> list[float] | None:
    """The three soft scores of generated ``ids`` from their per-step processed logits ``steps`` (each ``[vocab]``);
    None when the answer has no scores in upstream's format or a score token cannot be found."""
    if parse_answer(decode(ids, skip_special_tokens=True)) is None:
        return None
    index = [score_index(label, ids, decode) for label in LABELS]
    if min(index) < 0:
        return None
    return [soft_score(steps[i], digit_ids) for i in index]


def read_template(path: str) -> str:
    """The query text with ``$t2v_prompt``: ``VS2_QUERY_TEMPLATE``'s text in upstream's script or model card, or a
    text file's whole content."""
    if not os.path.isfile(path):
        raise VpoError(
            f"reward videoscore2: prompt text not found at {path}; pass videoscore2.prompt_template=PATH to "
            "VideoScore2's vs2_inference.py (github TIGER-AI-Lab/VideoScore2) or its model card README.md"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = CARD_TEMPLATE.search(text)
    text = found.group(1) if found else text
    if "$t2v_prompt" not in text:
        raise VpoError(f"reward videoscore2: {path} holds no VS2_QUERY_TEMPLATE nor a text with $t2v_prompt")
    return text


class VideoScore2Reward:
    """VideoScore2's three soft scores (1 to 5) and their mean; ``last_texts`` holds the answers of the last call.

    ``__call__(frames, prompts, fps)``: frames float ``[B, T, 3, H, W]`` in [0, 1] at ``fps`` frames a second.
    """

    name = "videoscore2"
    differentiable = False
    takes_fps = True
    dimensions = (*DIMENSIONS, "overall")
    score_range = (1.0, 5.0)

    def __init__(self, model, tokenizer, chat_template: str, template: str, setup: dict):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.template, self.setup = Template(template), setup
        self.device = next(model.parameters()).device
        self.token_types = takes_token_types(model)
        self.digit_ids = [tokenizer.encode(str(s), add_special_tokens=False)[0] for s in range(1, 6)]
        self.last_texts: list[str] = []

    def query(self, prompt: str) -> str:
        """The chat text upstream renders for ``prompt``, with one video placeholder."""
        content = [
            {"type": "video", "video": "video"},
            {"type": "text", "text": self.template.substitute(t2v_prompt=prompt)},
        ]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip

    def pixels(self, video: torch.Tensor, fps: float | None) -> tuple[torch.Tensor, list[int], list[int]]:
        """One video ``[T, 3, H, W]`` -> Qwen2.5-VL patches ``[t * h * w, D]``, the grid ``[t, h, w]`` and the
        frame indices kept (:func:`qwen_video`)."""
        return qwen_video(video, fps, self.setup)

    def inputs(self, video: torch.Tensor, prompt: str, fps: float | None) -> dict:
        """The model's inputs for one video, as upstream's processor makes them."""
        s = self.setup
        pixels, grid, _ = self.pixels(video, fps)
        n_video = grid[0] * grid[1] * grid[2] // (s["merge"] ** 2)
        text = self.query(prompt).replace(VIDEO_TOKEN, VIDEO_TOKEN * n_video)
        return dict(
            **text_inputs(self.tokenizer, text, self.device, self.token_types),
            pixel_values_videos=pixels.to(self.model.dtype), video_grid_thw=torch.tensor([grid], device=self.device),
            second_per_grid_ts=torch.tensor([s["temporal"] / s["fps"]], device=self.device),
        )  # fmt: skip

    def generate(self, video: torch.Tensor, prompt: str, fps: float | None):
        """Generate one answer: ``(generated ids, per-step processed logits [vocab] each)``."""
        s = self.setup
        inputs = self.inputs(video, prompt, fps)
        sample = {"do_sample": True, "temperature": s["temperature"]} if s["temperature"] > 0 else {"do_sample": False}
        out = self.model.generate(
            **inputs, max_new_tokens=s["max_new_tokens"], output_scores=True, return_dict_in_generate=True, **sample
        )
        return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), [step[0] for step in out.scores]

    def __call__(self, frames: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        rows, self.last_texts = [], []
        for video, prompt in zip(frames.to(self.device), prompts, strict=True):
            ids, steps = self.generate(video, prompt, fps)
            self.last_texts.append(self.decode(ids, skip_special_tokens=True))
            rows.append(read_scores(ids, steps, self.decode, self.digit_ids) or [math.nan] * 3)
        failed = sum(math.isnan(r[0]) for r in rows)
        if failed:
            log.warning(
                "reward videoscore2: %d of %d answers hold no scores in VideoScore2's format; their scores are NaN",
                failed, len(rows),
            )  # fmt: skip
        scores = torch.tensor(rows, dtype=torch.float32, device=self.device)
        return {**{name: scores[:, i] for i, name in enumerate(DIMENSIONS)}, "overall": scores.mean(1)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def load_videoscore2(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> VideoScore2Reward:
    """The ``videoscore2`` reward from a VideoScore2 folder (see the module docstring).

    Options: ``fps`` (frames sampled a second, default 2), ``max_new_tokens`` (default 1024), ``temperature``
    (0: greedy, the default; above 0 samples as upstream does at 0.7), ``prompt_template`` (upstream's
    ``vs2_inference.py``, its model card or a text file; default ``README.md`` in the folder).
    """
    options = check_options("videoscore2", options, DEFAULTS)
    check_qwen25_vl(path, "reward videoscore2", "--reward-path", WHAT)
    template = read_template(str(options["prompt_template"] or os.path.join(str(path), "README.md")))
    model, tokenizer, chat_template, setup = load_qwen25_vl(path, DEFAULT_ID, "videoscore2", WHAT, device, dtype)
    setup.update(fps=float(options["fps"]), max_new_tokens=int(options["max_new_tokens"]),
                 temperature=float(options["temperature"]))  # fmt: skip
    return VideoScore2Reward(model, tokenizer, chat_template, template, setup)


def check_qwen25_vl(path: str | None, name: str, flag: str, what: str) -> None:
    """Refuse in one line a missing ``path``, a local one that does not exist, a damaged config.json, or a local
    folder that holds no Qwen2.5-VL."""
    if not path:
        raise VpoError(f"{name} needs {flag}: {what}")
    if looks_local(str(path)) and not os.path.exists(str(path)):
        raise VpoError(f"{name}: {flag} {path} does not exist; pass {what}")
    kind = read_json(str(path), "config.json", name, what).get("model_type") if os.path.isdir(str(path)) else None
    if os.path.isdir(str(path)) and kind != "qwen2_5_vl":
        raise VpoError(f"{name}: {path} holds a {kind or 'non-transformers'} model, not {what}")


def load_qwen25_vl(path: str, default_id: str, name: str, what: str, device, dtype):
    """A Qwen2.5-VL judge checkpoint: ``(model, tokenizer, chat template, setup)``, where ``setup`` holds the video
    processor's mean, std, patch, temporal patch and merge sizes from ``preprocessor_config.json``."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = load_pretrained(Qwen2_5_VLForConditionalGeneration, path, default_id, name, what, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat_template = tokenizer.chat_template or read_json(path, "chat_template.json").get("chat_template")
    image = read_json(path, "preprocessor_config.json")
    setup = {
        "mean": image.get("image_mean", (0.48145466, 0.4578275, 0.40821073)),
        "std": image.get("image_std", (0.26862954, 0.26130258, 0.27577711)),
        "patch": image.get("patch_size", 14),
        "temporal": image.get("temporal_patch_size", 2),
        "merge": image.get("merge_size", 2),
    }
    return model, tokenizer, chat_template, setup
