"""``videoscore``: TIGER-Lab's VideoScore (v1 and v1.1) as a differentiable reward with five 1-4 dimensions.

VideoScore is Idefics2-8B (SigLIP vision tower, perceiver connector, Mistral-7B decoder) with a regression head: a
``Linear(text hidden, 5)`` read at the last non-pad token. It was trained with the ``mantis`` package, which does
not run on transformers 5, so the model class lives here; all preprocessing is torch, so gradients reach the pixels.

Parameter names, checked by hand (the June 2024 code that trained the checkpoint vs the installed transformers 5.23):

- Mantis' ``Idefics2ForSequenceClassification`` (github TIGER-AI-Lab/Mantis, mantis/models/idefics2/
  modeling_idefics2.py, added in commit 389c2e8 and unchanged since; mantis/train/train_idefics2.py builds it with
  ``num_labels=5``, ``problem_type=regression``) holds ``self.model = Idefics2Model(config)`` and
  ``self.score = nn.Linear(text_config.hidden_size, num_labels)``, i.e. a head *with* a bias. Published keys are
  therefore ``model.vision_model.*``, ``model.connector.*`` (``modality_projection``, ``perceiver_resampler``),
  ``model.text_model.*`` (a ``MistralModel``), ``score.weight`` and ``score.bias``. The published
  ``model.safetensors.index.json`` could not be read offline; the names follow from that code. To be safe either
  way, a checkpoint without ``score.bias`` also loads (the bias stays zero).
- transformers 5.23 ``Idefics2Model`` names its children ``vision_model``, ``connector``
  (``modality_projection``, ``perceiver_resampler``) and ``text_model``, with the same leaf names as Mantis' copy;
  ``conversion_mapping.py`` has no idefics2 entry, so keys load unrenamed (only the generic "legacy" renames apply).
- Mantis sizes the perceiver's RMS norms from the text config; transformers 5 uses the perceiver config's own
  ``rms_norm_eps`` (1e-6) unless the hidden sizes differ, so ``VideoScoreModel`` copies the text values over.

Inputs follow the Idefics2 processor: each frame becomes ``<fake_token_around_image>`` + ``<image>`` x
``resampler_n_latents`` + ``<fake_token_around_image>`` (one space between frames), the text is tokenised with the
checkpoint's tokenizer (BOS added), frames are resized with the processor's shortest/longest-edge rule (bilinear)
and normalised with its mean/std, without image splitting (Mantis trained with ``do_image_splitting=False``).

The query text: VideoScore was trained with a fixed instruction that embeds the text prompt, followed by one
``<image>`` per frame. Its model card (the checkpoint's ``README.md``) prints that instruction in its example code as
``REGRESSION_QUERY_PROMPT``; vpotool reads it from there by default, so the published scores come out. A folder
without that model card falls back to vpotool's own short ``PROMPT_TEMPLATE`` (scores then shift, by up to about 1 in
the logits); ``prompt_template=PATH`` names a template file instead (``{prompt}`` or the upstream ``{text_prompt}``
marks the prompt; ``{frames}`` marks the frames, else they are appended at the end, as upstream does).

Frames: upstream keeps ``floor(i * T / N)`` for ``i < N`` of a video's T frames when T > N (the first frame, not
always the last), else all of them; ``frame_pick=spaced`` takes N evenly spaced frames, first and last included.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Idefics2Model, Idefics2PreTrainedModel

from vpotool.errors import VpoError, first_line
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import (
    check_options,
    load_pretrained,
    normalize,
    optional_file,
    pick_frames,
    read_json,
    weights_path,
)

DIMENSIONS = (
    "visual_quality",
    "temporal_consistency",
    "dynamic_degree",
    "text_to_video_alignment",
    "factual_consistency",
)
DEFAULT_ID = "TIGER-Lab/VideoScore-v1.1"
WHAT = "a VideoScore checkpoint folder (v1 or v1.1)"
OPTIONS = ("frames", "prompt_template", "frame_pick")
CARD_TEMPLATE = re.compile(r'REGRESSION_QUERY_PROMPT\s*=\s*"""(.*?)"""', re.DOTALL)
CARD_FRAMES = re.compile(r"MAX_NUM_FRAMES\s*=\s*(\d+)")
IMAGE_TOKEN, FAKE_TOKEN = "<image>", "<fake_token_around_image>"
V1_FRAMES, V11_FRAMES = 16, 48  # the frame counts the model cards give for VideoScore and VideoScore-v1.1

PROMPT_TEMPLATE = (
    "Rate the AI-generated video shown in the frames below for visual quality, temporal consistency, dynamic "
    "degree, alignment with its text prompt and factual consistency.\n"
    'Text prompt: "{prompt}"\n'
    "Frames:\n{frames}"
)


class VideoScoreModel(Idefics2PreTrainedModel):
    """Idefics2 with VideoScore's regression head; parameter names match the published checkpoints."""

    _keys_to_ignore_on_load_missing = [r"^score\.bias$"]  # a bias-free head loads too; its bias stays zero

    def __init__(self, config):
        # size the perceiver as Mantis, which trained VideoScore, did (see the module docstring)
        config.perceiver_config.hidden_size = config.text_config.hidden_size
        config.perceiver_config.rms_norm_eps = config.text_config.rms_norm_eps
        super().__init__(config)
        self.model = Idefics2Model(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels)
        self.post_init()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Float ``[N, 3, H, W]`` normalised images -> ``[N, resampler_n_latents, text hidden]``.

        Every image is whole (no padding), so the patch mask is all ones; unlike ``Idefics2Model`` this keeps
        all-zero images (a mid-grey frame normalises to zeros) instead of dropping them as padding.
        """
        p = self.config.vision_config.patch_size
        n, _, h, w = pixel_values.shape
        patches = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        hidden = self.model.vision_model(pixel_values=pixel_values, patch_attention_mask=patches).last_hidden_state
        return self.model.connector(hidden, attention_mask=patches.view(n, -1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        """Scores ``[B, num_labels]`` in the model dtype.

        ``input_ids``/``attention_mask`` long ``[B, L]``, each row holding ``N * resampler_n_latents`` image tokens;
        ``pixel_values`` float ``[B, N, 3, H, W]``. The head reads the last position whose mask is 1. Pad on the
        right: the decoder numbers positions from the first column, so left padding would shift them.
        """
        features = self.image_features(pixel_values.flatten(0, 1).to(self.dtype))
        embeds = self.model.get_input_embeddings()(input_ids)
        is_image = (input_ids == self.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_image, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        hidden = self.model.text_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(1)
        return self.score(hidden.last_hidden_state[torch.arange(len(last), device=last.device), last])


def resize_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """The Idefics2 processor's output size: the long side is capped at ``longest`` (keeping the aspect ratio,
    truncating the other side), then each side is raised to at least ``shortest`` on its own."""
    aspect = width / height
    if width >= height and width > longest:
        width = longest
        height = int(width / aspect)
    elif height > width and height > longest:
        height = longest
        width = int(height * aspect)
    return max(height, shortest), max(width, shortest)


def build_query(template: str, prompt: str, frames_text: str) -> str:
    """``template`` with ``{frames}`` replaced by ``frames_text`` (appended when absent) and ``{prompt}`` or
    ``{text_prompt}`` by ``prompt``."""
    text = template.replace("{frames}", frames_text) if "{frames}" in template else template + frames_text
    return text.replace("{text_prompt}", prompt).replace("{prompt}", prompt)


def upstream_frames(frames: torch.Tensor, n: int) -> torch.Tensor:
    """The frames VideoScore's inference code keeps of ``[B, T, ...]``: ``floor(i * T / n)`` for ``i < n``, computed
    as its ``np.arange(0, T, T / n).astype(int)``, when T > n; all T frames otherwise."""
    import numpy as np

    t = frames.shape[1]
    if t <= n:
        return frames
    index = torch.from_numpy(np.arange(0, t, t / n).astype(np.int64)).to(frames.device)
    return frames.index_select(1, index)


class VideoScoreReward:
    """VideoScore's five dimensions (about 1 to 4, higher is better); ``overall`` is their mean.

    Each video gives at most ``frames`` frames, picked as upstream picks them (:func:`upstream_frames`) or, with
    ``pick="spaced"``, evenly spaced with first and last. The whole batch goes through the model at once, prompts
    right-padded.
    """

    name = "videoscore"
    differentiable = True
    dimensions = (*DIMENSIONS, "overall")
    score_range = (1.0, 4.0)

    def __init__(
        self, model: VideoScoreModel, tokenizer, frames: int, template: str = PROMPT_TEMPLATE, image=None,
        pick: str = "upstream",
    ):  # fmt: skip
        image = image or {}
        self.model, self.tokenizer, self.frames, self.template = model, tokenizer, frames, template
        self.pick = pick
        self.device = next(model.parameters()).device
        self.image_seq_len = model.config.perceiver_config.resampler_n_latents
        size = image.get("size") or {}
        self.edges = (size.get("shortest_edge", 378), size.get("longest_edge", 980))
        self.mean = image.get("image_mean", (0.5, 0.5, 0.5)) if image.get("do_normalize", True) else (0, 0, 0)
        self.std = image.get("image_std", (0.5, 0.5, 0.5)) if image.get("do_normalize", True) else (1, 1, 1)
        self.mode = "bicubic" if image.get("resample") == 3 else "bilinear"  # PIL codes: 2 bilinear, 3 bicubic
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """Float ``[N, 3, H, W]`` in [0, 1] -> resized, normalised float32 ``[N, 3, H', W']``, differentiably."""
        images = frames.float()
        size = resize_size(*images.shape[-2:], *self.edges)
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode=self.mode, align_corners=False, antialias=True)
        return normalize(images, self.mean, self.std)

    def tokens(self, prompts: list[str], n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask``, long ``[B, L]``, on the reward's device."""
        frame = f"{FAKE_TOKEN}{IMAGE_TOKEN * self.image_seq_len}{FAKE_TOKEN} "
        rows = [self.tokenizer(build_query(self.template, p, frame * n_frames))["input_ids"] for p in prompts]
        want = n_frames * self.image_seq_len
        for prompt, row in zip(prompts, rows, strict=True):
            if sum(i == self.model.config.image_token_id for i in row) != want:
                raise VpoError(
                    f"reward videoscore: the query for prompt {prompt[:40]!r} does not hold {want} image tokens; "
                    f"remove '{IMAGE_TOKEN}' from prompts and templates"
                )
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        pick = upstream_frames if self.pick == "upstream" else pick_frames
        x = pick(frames.to(self.device), self.frames)
        b, t = x.shape[:2]
        images = self.pixels(x.flatten(0, 1))
        ids, mask = self.tokens(prompts, t)
        scores = self.model(ids, mask, images.view(b, t, *images.shape[1:])).float()
        out = {name: scores[:, i] for i, name in enumerate(DIMENSIONS)}
        out["overall"] = scores.mean(1)
        return out


def default_frames(config, path: str, card: str) -> int:
    """Frames per video when the ``frames`` option is unset: a count the checkpoint's config records
    (``num_frames``/``max_num_frames``), else the ``MAX_NUM_FRAMES`` its model card's code sets (16 for VideoScore,
    48 for v1.1); neither is a one-line ``VpoError``, never a guess from the folder's name."""
    for key in ("num_frames", "max_num_frames"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    found = CARD_FRAMES.search(card)
    if found and int(found.group(1)) > 0:
        return int(found.group(1))
    raise VpoError(
        f"reward videoscore: {path} records no frame count (no num_frames in its config, no MAX_NUM_FRAMES in a "
        f"README.md model card); pass --reward-options videoscore.frames={V11_FRAMES} for VideoScore-v1.1, "
        f"{V1_FRAMES} for VideoScore v1"
    )


def model_card(where: str) -> str:
    """The checkpoint's ``README.md`` (its model card), or "" when it has none."""
    card = optional_file(where, "README.md")
    if not card:
        return ""
    with open(card, encoding="utf-8", errors="replace") as f:
        return f.read()


def card_template(card: str) -> str | None:
    """The query instruction printed in a model card's code (``REGRESSION_QUERY_PROMPT``); None when the card has
    none."""
    found = CARD_TEMPLATE.search(card)
    if not found or ("{text_prompt}" not in found.group(1) and "{prompt}" not in found.group(1)):
        return None
    return found.group(1)


def read_template(path: str) -> str:
    """A query template file: text holding ``{prompt}`` (or ``{text_prompt}``) and optionally ``{frames}``."""
    if not os.path.isfile(path):
        raise VpoError(f"reward videoscore: prompt_template file not found: {path} (pass a text file path)")
    with open(path) as f:
        template = f.read()
    return check_template(template, path)


def check_template(template: str, path: str) -> str:
    """``template`` if it marks the prompt and holds no image tokens, else a one-line ``VpoError``."""
    if "{prompt}" not in template and "{text_prompt}" not in template:
        raise VpoError(f"reward videoscore: prompt_template {path} has no {{prompt}} placeholder; add one")
    if IMAGE_TOKEN in template or FAKE_TOKEN in template:
        raise VpoError(f"reward videoscore: prompt_template {path} holds image tokens; mark frames with {{frames}}")
    return template


def load_videoscore(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> VideoScoreReward:
    """The ``videoscore`` reward from a VideoScore checkpoint folder or hub id (default ``DEFAULT_ID``).

    Options: ``frames`` (frames per video; see ``default_frames``), ``prompt_template`` (path of a query template
    file; default: the model card's, see the module docstring), ``frame_pick`` (upstream or spaced). The tokenizer
    and ``preprocessor_config.json`` come from the same checkpoint.
    """
    from transformers import AutoTokenizer

    options = check_options("videoscore", options, dict.fromkeys(OPTIONS))
    model = load_pretrained(VideoScoreModel, path, DEFAULT_ID, "videoscore", WHAT, device, dtype)
    where = weights_path(path, DEFAULT_ID, "videoscore", WHAT)
    if model.config.num_labels != len(DIMENSIONS):
        raise VpoError(
            f"reward videoscore: {where} has a {model.config.num_labels}-output head, VideoScore has "
            f"{len(DIMENSIONS)}; pass --reward-path with {WHAT}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = first_line(e)
        raise VpoError(f"reward videoscore: no usable tokenizer in {where}: {first} (pass {WHAT})") from e
    vocab = tokenizer.get_vocab()
    if vocab.get(IMAGE_TOKEN) != model.config.image_token_id or FAKE_TOKEN not in vocab:
        raise VpoError(
            f"reward videoscore: the tokenizer in {where} lacks {FAKE_TOKEN} or does not map {IMAGE_TOKEN} to "
            f"image_token_id {model.config.image_token_id}; pass {WHAT}"
        )
    image = read_json(where, "preprocessor_config.json")
    if image.get("do_image_splitting"):
        raise VpoError(
            f"reward videoscore: {where}/preprocessor_config.json asks for image splitting, which VideoScore was "
            f"not trained with and vpotool does not do; set do_image_splitting to false"
        )
    card = model_card(where)
    frames = options["frames"] or default_frames(model.config, where, card)
    if options.get("prompt_template") == "builtin":  # vpotool's own instruction, asked for by name
        template = PROMPT_TEMPLATE
    elif options.get("prompt_template") is not None:
        template = read_template(options["prompt_template"])
    else:
        instruction = card_template(card)
        if instruction is None:
            raise VpoError(
                f"reward videoscore: {where} has no model card (README.md with REGRESSION_QUERY_PROMPT) to take the "
                "query from, and another instruction moves the scores; copy the checkpoint's README.md there, or "
                "pass --reward-options videoscore.prompt_template=FILE (or =builtin for vpotool's own)"
            )
        template = check_template(instruction, f"{where}/README.md")
    pick = options.get("frame_pick") or "upstream"
    if pick not in ("upstream", "spaced"):
        raise VpoError(f"reward videoscore: frame_pick must be upstream or spaced (got {pick!r})")
    return VideoScoreReward(model, tokenizer, frames, template, image, pick)
