"""``videoalign``: VideoAlign's VideoReward (KwaiVGI), a Qwen2-VL-2B Bradley-Terry-with-ties reward model with three
heads: visual quality (VQ), motion quality (MQ) and text alignment (TA).

The published folder (``KwaiVGI/VideoReward``) holds ``model_config.json`` (the training run's data, model and LoRA
configs plus ``inference_config``: each head's mean and std) and ``checkpoint-<step>/`` with either ``model.pth``
(a whole state dict) or a peft LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``) plus
``non_lora_state_dict.pth`` (the other trained weights: vision tower, merger, reward head, token embeddings).
The base Qwen2-VL (its config, tokenizer, image processor settings and, for the LoRA layout, its weights) comes
from ``model_config.model_name_or_path`` (``Qwen/Qwen2-VL-2B-Instruct``) or the ``base`` option. The state dicts
use transformers 4.45's names; they are renamed to transformers 5's and the LoRA deltas merged into the weights.

Scoring as upstream's ``VideoVLMRewardInference.reward``: frames picked at 2 fps from the video's own fps (at
least 4, an even count, spaced with ``linspace(0, T - 1, n).round()``), each resized to qwen-vl-utils'
``smart_resize`` size (sides multiples of 28, pixels within [128 * 28 * 28, ``max_frame_pixels``]; bicubic,
antialiased, rounded to 8 bits as its uint8 frames are), rescaled and normalised by the base processor's mean/std
and cut into Qwen2-VL patches. The query is the chat-template rendering of the video placeholder plus upstream's
prompt text for ``prompt_template_type`` (``detailed_special``: one ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` token each); the linear ``rm_head`` on the last hidden state is read at the i-th reward token
for head i. Positions are plain token positions (upstream's reward model does not compute Qwen2-VL's 3-D rope
indices). Heads are normalised ``(x - mean) / std``; ``overall`` is their weighted sum (weights 1, as upstream's).

The prompt text is not part of the checkpoint and vpotool carries no copy: it is read from VideoAlign's
``prompt_template.py`` (``prompt_template=PATH``, or that file copied into the checkpoint folder) or from a text file
holding the template with ``{text_prompt}``. Rounding to 8 bits passes gradients straight through, so the reward is
differentiable.
"""

from __future__ import annotations

import ast
import glob
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vpotool.errors import VpoError, first_line
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import (
    SafetensorError,
    check_options,
    damaged_weights,
    freeze,
    normalize,
    read_config,
    read_json,
    read_state_dict,
)

HEADS = ("VQ", "MQ", "TA")
DIMENSIONS = ("visual_quality", "motion_quality", "text_alignment")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_TOKEN = "<|video_pad|>"
WHAT = "a VideoReward checkpoint folder (KwaiVGI/VideoReward: model_config.json and checkpoint-*/)"
# qwen-vl-utils' video constants, as VideoAlign's vision_process.py uses them
FACTOR, FRAME_FACTOR, MAX_RATIO = 28, 2, 200
VIDEO_MIN_PIXELS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 128 * 28 * 28, 4, 768
TEMPLATE_NAMES = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"}  # names in upstream prompt_template.py
DEFAULTS = {
    "vq": 1.0, "mq": 1.0, "ta": 1.0, "norm": True, "fps": None, "max_pixels": None, "base": None, "step": None,
    "prompt_template": None,
}  # fmt: skip


def sample_count(total: int, video_fps: float | None, fps: float, num_frames: int | None = None) -> int:
    """How many of a video's ``total`` frames upstream keeps (qwen-vl-utils' ``smart_nframes``): ``total /
    video_fps * fps`` clamped to [4, min(768, total)] and rounded to an even count; ``num_frames`` (when the
    checkpoint fixes one) rounded to even. Without ``video_fps`` the frames are taken to be at ``fps``."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = total / (video_fps or fps) * fps
        n = round(min(max(n, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise VpoError(
            f"reward videoalign: a video of {total} frames gives {n} frames to score; VideoReward needs at least "
            f"{FRAME_FACTOR} (pass longer videos)"
        )
    return n


def frame_indices(total: int, n: int) -> torch.Tensor:
    """``n`` frame indices of ``total``: ``linspace(0, total - 1, n).round()``, long ``[n]``."""
    return torch.linspace(0, total - 1, n).round().long()


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """qwen-vl-utils' frame size: each side rounded to a multiple of ``factor``; when that holds more than
    ``max_pixels`` (or fewer than ``min_pixels``), both sides scaled by one factor and floored (ceiled) instead."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VpoError(f"reward videoalign: frames of {height}x{width} are beyond Qwen2-VL's aspect ratio of 200")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def round_through(x: torch.Tensor) -> torch.Tensor:
    """``x.round()`` in the forward pass, identity in the backward pass."""
    return x + (x.round() - x).detach()


def patchify(video: torch.Tensor, patch: int, temporal: int, merge: int) -> torch.Tensor:
    """Qwen2-VL's patches of normalised ``[B, T, C, H, W]`` frames -> ``[B * t * h * w, C * temporal * patch**2]``
    in the image processor's order (patches of a ``merge`` x ``merge`` block next to each other)."""
    b, t, c, h, w = video.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = video.reshape(b, gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gt * gh * gw, c * temporal * patch * patch)


def video_patches(frames: torch.Tensor, size: tuple[int, int], setup: dict) -> tuple[torch.Tensor, list[int]]:
    """The kept frames ``[B, n, 3, H, W]`` (float in [0, 1]) as qwen-vl-utils and the Qwen-VL processor make them:
    read as 8-bit, resized to ``size`` (bicubic, antialiased, back to 8 bits), normalised with ``setup``'s ``mean``
    and ``std`` and cut into patches. Returns the patches ``[B * t * h * w, D]`` and the grid ``[t, h, w]``."""
    b, n, _, height, width = frames.shape
    x = round_through(frames.flatten(0, 1).float().clamp(0, 1) * 255)  # upstream reads 8-bit video
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = round_through(x.clamp(0, 255))  # torchvision's resize of uint8 frames returns uint8
    x = normalize(x / 255, setup["mean"], setup["std"]).view(b, n, 3, *size)
    patch, temporal, merge = setup["patch"], setup["temporal"], setup["merge"]
    grid = [n // temporal, size[0] // patch, size[1] // patch]
    return patchify(x, patch, temporal, merge), grid


class VideoAlignModel(nn.Module):
    """A transformers Qwen2-VL with VideoReward's ``rm_head`` (``Linear(hidden, heads, bias=False)``)."""

    def __init__(self, qwen, heads: int):
        super().__init__()
        self.qwen = qwen
        self.rm_head = nn.Linear(qwen.config.text_config.hidden_size, heads, bias=False, dtype=qwen.dtype)

    def forward(self, ids, mask, pixels, grid) -> torch.Tensor:
        """Per-token head outputs ``[B, L, heads]``: ``ids``/``mask`` long ``[B, L]`` (right padded), ``pixels``
        ``[N, patch dim]`` and ``grid`` long ``[B, 3]``. Text positions are 0..L-1, as upstream's forward uses."""
        m = self.qwen.model
        embeds = m.get_input_embeddings()(ids)
        video = m.visual(pixels.to(embeds.dtype), grid_thw=grid).pooler_output
        is_video = (ids == self.qwen.config.video_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_video, video.to(embeds.dtype))
        hidden = m.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return self.rm_head(hidden)


class VideoAlignReward:
    """VideoReward's VQ, MQ, TA (normalised by the checkpoint's stats unless ``norm`` is off) and their weighted sum.

    ``__call__(frames, prompts, fps)``: frames float ``[B, T, 3, H, W]`` in [0, 1] at ``fps`` frames a second.
    """

    name = "videoalign"
    differentiable = True
    takes_fps = True
    dimensions = (*DIMENSIONS, "overall")
    score_range = (-3.0, 3.0)  # three normalised heads, each about N(0, 1) on the training videos

    def __init__(self, model: VideoAlignModel, tokenizer, chat_template: str, template: str, setup: dict):
        self.model, self.tokenizer, self.chat_template, self.template = model, tokenizer, chat_template, template
        self.setup = setup
        self.device = next(model.parameters()).device
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))

    def query(self, prompt: str) -> str:
        """The chat text upstream renders for ``prompt``, with one video placeholder."""
        content = [
            {"type": "video", "video": "video"},
            {"type": "text", "text": self.template.format(text_prompt=prompt)},
        ]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def pixels(self, frames: torch.Tensor, fps: float | None) -> tuple[torch.Tensor, list[int]]:
        """Frames ``[B, T, 3, H, W]`` -> Qwen2-VL patches ``[B * t * h * w, D]`` and the grid ``[t, h, w]``."""
        s = self.setup
        _, total, _, height, width = frames.shape
        n = sample_count(total, fps, s["fps"], s["num_frames"])
        size = smart_resize(height, width, VIDEO_MIN_PIXELS, s["max_pixels"])
        if size[0] * size[1] < s["min_pixels"]:  # upstream's processor would resize those frames a second time
            raise VpoError(
                f"reward videoalign: max_pixels {s['max_pixels']} leaves frames of {size[0]}x{size[1]}, under the "
                f"processor's min_pixels {s['min_pixels']}; raise videoalign.max_pixels"
            )
        return video_patches(frames.index_select(1, frame_indices(total, n).to(frames.device)), size, s)

    def tokens(self, prompts: list[str], n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask, long ``[B, L]``, the video placeholder expanded to ``n_video`` tokens."""
        rows = []
        for prompt in prompts:
            text = self.query(prompt)
            ids = self.tokenizer(text.replace(VIDEO_TOKEN, VIDEO_TOKEN * n_video), add_special_tokens=False)
            ids = ids["input_ids"]
            if [i for i in ids if i in self.reward_ids] != self.reward_ids:
                raise VpoError(
                    f"reward videoalign: the query for prompt {prompt[:40]!r} does not hold the reward tokens "
                    f"{', '.join(REWARD_TOKENS)} once each in order; remove them from prompts and templates"
                )
            rows.append(ids)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.setup["pad_id"], dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def heads(self, frames: torch.Tensor, prompts: list[str], fps: float | None = None) -> torch.Tensor:
        """Raw head outputs ``[B, 3]`` (VQ, MQ, TA), float32."""
        check_frames(frames, prompts)
        pixels, grid = self.pixels(frames.to(self.device), fps)
        merge = self.setup["merge"]
        ids, mask = self.tokens(prompts, grid[0] * grid[1] * grid[2] // (merge * merge))
        grid_thw = torch.tensor([grid] * len(prompts), dtype=torch.long, device=self.device)
        logits = self.model(ids, mask, pixels, grid_thw)
        is_reward = torch.isin(ids, torch.tensor(self.reward_ids, device=ids.device))
        # the i-th reward token of a row carries head i, as upstream's diagonal read
        return logits[is_reward].view(len(prompts), 3, -1).diagonal(dim1=1, dim2=2).float()

    def __call__(self, frames: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        raw = self.heads(frames, prompts, fps)
        s = self.setup
        if s["norm"]:
            raw = (raw - torch.tensor(s["mean_std"][0], device=raw.device)) / torch.tensor(
                s["mean_std"][1], device=raw.device
            )
        out = {name: raw[:, i] for i, name in enumerate(DIMENSIONS)}
        out["overall"] = sum(s["weights"][i] * raw[:, i] for i in range(3))
        return out


def read_template(path: str, kind: str) -> str:
    """The prompt text of ``prompt_template_type`` ``kind``: the constant upstream's ``prompt_template.py`` names
    for it, or a text file's whole content; it must hold ``{text_prompt}``."""
    if not os.path.isfile(path):
        raise VpoError(
            f"reward videoalign: prompt text not found at {path}; pass videoalign.prompt_template=PATH to "
            f"VideoAlign's prompt_template.py (github KwaiVGI/VideoAlign) or copy that file into the checkpoint folder"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        name = TEMPLATE_NAMES.get(kind)
        found = [
            node.value.value
            for node in ast.parse(text).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and target.id == name
        ]
        if not found:
            raise VpoError(f"reward videoalign: {path} defines no {name} for prompt_template_type {kind!r}")
        text = found[0]
    if "{text_prompt}" not in text:
        raise VpoError(f"reward videoalign: the prompt text in {path} has no {{text_prompt}} placeholder")
    return text


def upstream_name(key: str) -> str | None:
    """A checkpoint key (transformers 4.45 names, maybe peft-wrapped) -> transformers 5 ``VideoAlignModel`` name;
    None for peft's frozen copies."""
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    if ".original_module." in key:
        return None
    if key.startswith("rm_head."):
        return key
    if key.startswith("visual."):
        return "qwen.model." + key
    if key.startswith("model."):
        return "qwen.model.language_model." + key.removeprefix("model.")
    return "qwen." + key


def checkpoint_dir(folder: str, step) -> str:
    """``checkpoint-<step>`` of ``folder``, the highest step when ``step`` is None."""
    found = glob.glob(os.path.join(folder, "checkpoint-*"))
    steps = {int(p.rsplit("-", 1)[1]): p for p in found if p.rsplit("-", 1)[1].isdigit()}
    if not steps:
        raise VpoError(f"reward videoalign: {folder} holds no checkpoint-<step> folder; pass {WHAT}")
    if step is not None and int(step) not in steps:
        raise VpoError(f"reward videoalign: {folder} has no checkpoint-{step}; it has steps {sorted(steps)}")
    return steps[int(step) if step is not None else max(steps)]


def load_weights(model: VideoAlignModel, ckpt: str) -> None:
    """Load ``model.pth`` or the LoRA layout of ``ckpt`` into ``model`` (LoRA merged into the weights)."""
    full = os.path.join(ckpt, "model.pth")
    files = [full] if os.path.isfile(full) else [os.path.join(ckpt, "non_lora_state_dict.pth")]
    if not os.path.isfile(files[0]):
        raise VpoError(f"reward videoalign: {ckpt} holds neither model.pth nor non_lora_state_dict.pth; pass {WHAT}")
    sd = read_state_dict(files[0], "videoalign", WHAT)
    if "rm_head.weight" not in {upstream_name(k) for k in sd}:
        raise VpoError(f"reward videoalign: {files[0]} holds no reward head (rm_head.weight); pass {WHAT}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in sd.items():
            name = upstream_name(key)
            if name is None or "lora_" in key:
                continue
            if name not in params or params[name].shape != value.shape:
                raise VpoError(
                    f"reward videoalign: {files[0]} weight {key} {tuple(value.shape)} fits no weight of the base "
                    f"model; pass {WHAT} with its base Qwen2-VL"
                )
            params[name].copy_(value)
        adapter = os.path.join(ckpt, "adapter_model.safetensors")
        if not os.path.isfile(full) and os.path.isfile(adapter):
            merge_lora(params, read_state_dict(adapter, "videoalign", WHAT), read_json(ckpt, "adapter_config.json"))


def merge_lora(params: dict, sd: dict, config: dict) -> None:
    """Add each LoRA pair's ``scale * B @ A`` to its linear weight (``scale = alpha / r``, or ``alpha / sqrt(r)``
    with rsLoRA)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise VpoError("reward videoalign: LoRA adapters with per-module ranks are not supported")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    for key, a in sd.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise VpoError(f"reward videoalign: adapter weight {key} is not a linear LoRA pair; not supported")
            continue
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        name = upstream_name(key.split(".lora_A.")[0] + ".weight")
        params[name].add_((b.float() @ a.float() * scale).to(params[name].dtype))


def load_videoalign(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> VideoAlignReward:
    """The ``videoalign`` reward from a local VideoReward folder (see the module docstring).

    Options: ``vq``, ``mq``, ``ta`` (head weights in ``overall``, default 1 each), ``norm`` (normalise heads by
    the checkpoint's means and stds, default true), ``fps`` and ``max_pixels`` (sampling rate and frame pixel budget;
    default the checkpoint's ``data_config``), ``base`` (the base Qwen2-VL; default ``model_name_or_path``),
    ``step`` (which ``checkpoint-<step>``; default the last), ``prompt_template`` (upstream's
    ``prompt_template.py`` or a text file; default ``prompt_template.py`` in the folder).
    """
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from vpotool.models.loading import quiet_loading

    options = check_options("videoalign", options, DEFAULTS)
    if not path:
        raise VpoError(f"reward videoalign: pass --reward-path with {WHAT}")
    if not os.path.isfile(os.path.join(str(path), "model_config.json")):
        raise VpoError(f"reward videoalign: no model_config.json in {path}; pass --reward-path with {WHAT}")
    config = read_config(os.path.join(path, "model_config.json"), "reward videoalign", WHAT)
    data, model_cfg = config.get("data_config", {}), config.get("model_config", {})
    if not model_cfg.get("use_special_tokens") or model_cfg.get("reward_token") != "special":
        raise VpoError(f"reward videoalign: {path} reads its heads at the {model_cfg.get('reward_token')!r} token; "
                       "vpotool reads VideoReward's special reward tokens only (use_special_tokens, reward_token "
                       "special)")  # fmt: skip
    kind = data.get("prompt_template_type")
    template = read_template(options["prompt_template"] or os.path.join(path, "prompt_template.py"), kind)
    base = options["base"] or model_cfg.get("model_name_or_path")
    if base and not os.path.isabs(base) and os.path.isdir(os.path.join(path, base)):
        base = os.path.join(path, base)
    quiet_loading()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        qwen = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        damaged = damaged_weights(base)
        if damaged:
            raise VpoError(f"reward videoalign: {damaged} is damaged or cut short; download the base Qwen2-VL "
                           "(Qwen2-VL-2B-Instruct) again") from e  # fmt: skip
        raise VpoError(
            f"reward videoalign: could not load the base Qwen2-VL from {base}: {first_line(e)} (pass "
            f"videoalign.base=DIR with Qwen2-VL-2B-Instruct)"
        ) from e
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    qwen.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = VideoAlignModel(qwen, int(model_cfg.get("output_dim", 3)))
    load_weights(model, checkpoint_dir(path, options["step"]))
    chat_template = tokenizer.chat_template or read_json(base, "chat_template.json").get("chat_template")
    image = read_json(base, "preprocessor_config.json")
    norm = config.get("inference_config") or {}
    missing = [f"{h}_{k}" for h in HEADS for k in ("mean", "std") if f"{h}_{k}" not in norm]
    if options["norm"] and missing:
        raise VpoError(
            f"reward videoalign: {path} records no head statistics ({missing[0]} missing from model_config.json's "
            "inference_config), so its heads cannot be normalised as upstream does; add them, or pass "
            "--reward-options videoalign.norm=false for raw head values"
        )
    setup = {
        "fps": float(options["fps"] or data.get("fps") or 2.0),
        "num_frames": data.get("num_frames"),
        "max_pixels": int(options["max_pixels"] or data.get("max_frame_pixels") or 240 * 320),
        "mean": image.get("image_mean", (0.48145466, 0.4578275, 0.40821073)),
        "std": image.get("image_std", (0.26862954, 0.26130258, 0.27577711)),
        "min_pixels": image.get("min_pixels", 56 * 56),
        "patch": image.get("patch_size", 14),
        "temporal": image.get("temporal_patch_size", 2),
        "merge": image.get("merge_size", 2),
        "pad_id": tokenizer.pad_token_id,
        "norm": bool(options["norm"]) and bool(norm),
        "mean_std": ([norm.get(f"{h}_mean", 0.0) for h in HEADS], [norm.get(f"{h}_std", 1.0) for h in HEADS]),
        "weights": [float(options[h.lower()]) for h in HEADS],
    }
    return VideoAlignReward(freeze(model.to(device)), tokenizer, chat_template, template, setup)
