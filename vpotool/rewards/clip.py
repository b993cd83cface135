"""CLIP-family rewards on transformers ``CLIPModel``: CLIP score and PickScore (text-video alignment), the LAION
aesthetic predictor and VBench background consistency, plus the shared CLIP feature helpers.

Frames are picked, resized and normalised in torch, so every score passes gradients back to the pixels. HPSv2 (an
open_clip checkpoint converted to ``CLIPModel``) lives in ``vpotool.rewards.hpsv2`` and reuses these helpers.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.nn.functional as F
from torch import nn

from vpotool.errors import VpoError, first_line
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import (
    CLIP_MEAN,
    CLIP_STD,
    check_options,
    frame_similarity,
    freeze,
    load_pretrained,
    looks_local,
    normalize,
    pick_frames,
    read_state_dict,
    resize_crop,
)

# ViT-L/14: the default backbone of torchmetrics' CLIPScore and the one the LAION aesthetic head was trained on.
CLIP_ID = "openai/clip-vit-large-patch14"
PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
# PickScore_v1 was fine-tuned from this model and its model card loads the processor from here.
PICKSCORE_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# VBench's background consistency loads OpenAI CLIP "ViT-B/32" (vbench/utils.py, clip.load).
BACKGROUND_ID = "openai/clip-vit-base-patch32"
DEFAULT_FRAMES = 8


# ---------------------------------------------------------------- shared helpers


def has_tokenizer(folder: str) -> bool:
    """True when ``folder`` holds tokenizer files (a folder without them would make a broken CLIP tokenizer)."""
    files = set(os.listdir(folder))
    return "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files


def load_tokenizer(reward: str, candidates: list[str | None]):
    """The first tokenizer ``AutoTokenizer`` loads from ``candidates`` (folders or hub ids, None skipped).

    A local folder counts only if it holds tokenizer files; when none loads, one ``VpoError`` line.
    """
    from transformers import AutoTokenizer

    tried, last = [], "no candidates"
    for c in (str(c) for c in candidates if c):
        tried.append(c)
        if looks_local(c) and not (os.path.isdir(c) and has_tokenizer(c)):
            last = f"{c} holds no tokenizer.json or vocab.json + merges.txt"
            continue
        try:
            return AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError, KeyError, TypeError) as e:
            last = first_line(e)
    from vpotool.models.loading import PlanTokenizer, weightless

    if weightless():  # `vpotool plan` on a config-only folder: prompts of the model's full length
        return PlanTokenizer()
    raise VpoError(f"reward {reward}: no tokenizer found in {', '.join(tried)} ({last}); pass a folder that holds one")


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so the long side is ``size`` (bicubic, antialiased), then pad to ``size`` x ``size``
    with zeros (black), centred: the HPSv2 package's ``ResizeMaxSize`` evaluation transform, differentiably."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new = (min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale))))
    images = F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new[0], size - new[1]
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; v4 a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeds(model, frames: torch.Tensor, n_frames: int | None = None, resize: str = "crop") -> torch.Tensor:
    """Projected CLIP image embeddings (not normalised) of ``n_frames`` evenly spaced frames.

    frames: float ``[B, T, 3, H, W]`` in [0, 1]. Each frame is resized to the model's ``image_size`` (``"crop"``:
    short side then centre crop, as CLIP processors do; ``"pad"``: see ``letterbox``) and normalised with the CLIP
    mean/std. Returns float32 ``[B, T', D]`` (T' = min(T, n_frames)), differentiable in ``frames``.
    """
    picked = pick_frames(frames, n_frames)
    b, t = picked.shape[:2]
    size = model.config.vision_config.image_size
    x = picked.flatten(0, 1).to(device=model.device, dtype=torch.float32)
    x = resize_crop(x, size) if resize == "crop" else letterbox(x, size)
    x = normalize(x, CLIP_MEAN, CLIP_STD).to(model.dtype)
    return _pooled(model.get_image_features(pixel_values=x)).float().view(b, t, -1)


@torch.no_grad()
def text_embeds(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Projected CLIP text embeddings (not normalised) of ``prompts``, truncated to the model's context length.

    Returns float32 ``[B, D]``; no gradient (nothing upstream of the text is trained).
    """
    max_len = model.config.text_config.max_position_embeddings
    tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    ids, mask = tok["input_ids"].to(model.device), tok["attention_mask"].to(model.device)
    return _pooled(model.get_text_features(input_ids=ids, attention_mask=mask)).float()


# ---------------------------------------------------------------- rewards


class AlignmentReward:
    """Text-video alignment as ``scale * cos(image, text)`` averaged over frames, for CLIP score, PickScore and
    HPSv2 (which differ in weights, scale and resizing; see their loaders)."""

    differentiable = True

    def __init__(self, name, dimension, model, tokenizer, frames, scale=1.0, score_range=(0.0, 1.0), resize="crop"):
        self.name, self.dimensions, self.score_range = name, (dimension, "overall"), score_range
        self.model, self.tokenizer, self.frames = model, tokenizer, frames
        self.scale, self.resize, self.device = float(scale), resize, model.device

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        img = F.normalize(image_embeds(self.model, frames, self.frames, self.resize), dim=-1)  # [B, T, D]
        txt = F.normalize(text_embeds(self.model, self.tokenizer, prompts), dim=-1)  # [B, D]
        score = self.scale * (img * txt[:, None]).sum(-1).mean(1)
        return {self.dimensions[0]: score, "overall": score}


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor head: a linear MLP (no activations) from an L2-normalised CLIP image
    embedding to a 1-10 rating.

    Layer layout and state-dict keys follow ``MLP`` in christophschuhmann/improved-aesthetic-predictor
    (``simple_inference.py``; the ReLUs are commented out there, the "linearMSE" weights were trained so):
    ``layers.{0,2,4,6,7}.{weight,bias}`` for Linear(dim, 1024), Linear(1024, 128), Linear(128, 64), Linear(64, 16),
    Linear(16, 1), with Dropout at 1, 3 and 5. VADER and DDPO load ``sac+logos+ava1-l14-linearMSE.pth`` into this
    layout with ``load_state_dict``; dim is 768 for CLIP ViT-L/14.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` normalised embeddings -> ``[..., 1]`` ratings."""
        return self.layers(embeds)


class AestheticReward:
    """LAION aesthetic score (about 1-10) of each frame's normalised CLIP embedding, mean over frames."""

    name = "aesthetic"
    differentiable = True
    dimensions = ("aesthetic", "overall")
    # Nominal 1-10. VBench's aesthetic quality is not this head: it uses LAION's v1 predictor (one Linear(768, 1) on
    # the same normalised CLIP ViT-L/14 embedding, sa_0_4_vit_l_14_linear.pth) divided by 10, so its numbers
    # (about 0.45-0.65 for current video models) are not this score / 10.
    score_range = (4.0, 7.0)

    def __init__(self, model, head: AestheticMLP, frames: int | None = DEFAULT_FRAMES):
        self.model, self.head, self.frames, self.device = model, head, frames, model.device

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        img = F.normalize(image_embeds(self.model, frames, self.frames), dim=-1)
        score = self.head(img).squeeze(-1).mean(1)
        return {"aesthetic": score, "overall": score}


class BackgroundReward:
    """VBench background consistency: ``frame_similarity`` of per-frame CLIP image embeddings; prompts unused."""

    name = "background"
    differentiable = True
    dimensions = ("background_consistency", "overall")
    score_range = (0.9, 1.0)  # VBench reports about 0.92-0.98 for current video models

    def __init__(self, model, frames: int | None = None):
        self.model, self.frames, self.device = model, frames, model.device

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = frame_similarity(image_embeds(self.model, frames, self.frames))
        return {"background_consistency": score, "overall": score}


# ---------------------------------------------------------------- loaders


def _clip_model(path, default_id, reward, what, device, dtype):
    from transformers import CLIPModel

    return load_pretrained(CLIPModel, path, default_id, reward, what, device=device, dtype=dtype)


def load_clip(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> AlignmentReward:
    """CLIP score: cosine between each frame's CLIP image embedding and the prompt's, mean over frames.

    ``path``: a transformers CLIP folder or hub id with its tokenizer (default ``openai/clip-vit-large-patch14``).
    Options: ``frames`` (default 8). The dimension ``clip_score`` is the raw cosine (about 0.15-0.40 for ViT-L/14);
    the common CLIPScore convention reports ``100 * max(cos, 0)`` (torchmetrics) or ``2.5 * max(cos, 0)`` (Hessel et
    al.), both monotone in this value.
    """
    opts = check_options("clip", options, {"frames": DEFAULT_FRAMES})
    model = _clip_model(path, CLIP_ID, "clip", "a CLIP checkpoint folder", device, dtype)
    tokenizer = load_tokenizer("clip", [path or CLIP_ID])
    return AlignmentReward("clip", "clip_score", model, tokenizer, opts["frames"], score_range=(0.15, 0.40))


def load_pickscore(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> AlignmentReward:
    """PickScore_v1: ``logit_scale.exp() * cos(image, text)`` (the model's own learnt scale, about 100), mean over
    frames, as in the model card's ``calc_probs`` before the softmax.

    ``path``: the PickScore CLIP folder or hub id (default ``yuvalkirstain/PickScore_v1``). The tokenizer is taken
    from that folder when it holds one, else from option ``tokenizer``, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    (the processor PickScore's card uses). Options: ``frames`` (default 8), ``tokenizer``.
    """
    opts = check_options("pickscore", options, {"frames": DEFAULT_FRAMES, "tokenizer": None})
    model = _clip_model(path, PICKSCORE_ID, "pickscore", "the PickScore_v1 folder", device, dtype)
    where = path or PICKSCORE_ID
    candidates = [opts["tokenizer"]] if opts["tokenizer"] else [where, PICKSCORE_TOKENIZER_ID]
    tokenizer = load_tokenizer("pickscore", candidates)
    scale = model.logit_scale.exp().item()
    return AlignmentReward("pickscore", "pickscore", model, tokenizer, opts["frames"], scale, score_range=(18.0, 24.0))


def _aesthetic_head_file(path: str) -> str:
    heads = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "aesthetic*.safetensors")))
    if len(heads) != 1:
        found = f"found {len(heads)}: {', '.join(os.path.basename(h) for h in heads)}" if heads else "found none"
        raise VpoError(
            f"reward aesthetic: {path} must hold exactly one head file (*.pth or aesthetic*.safetensors), {found}; "
            f"put sac+logos+ava1-l14-linearMSE.pth there or pass the head file itself as --reward-path"
        )
    return heads[0]


def load_aesthetic(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> AestheticReward:
    """The LAION improved aesthetic predictor (``AestheticMLP`` on normalised CLIP ViT-L/14 image embeddings).

    ``path`` is either the head file (``sac+logos+ava1-l14-linearMSE.pth`` or a ``.safetensors`` with the same
    keys), with CLIP from option ``clip`` (default ``openai/clip-vit-large-patch14``), or a folder holding a
    transformers CLIP checkpoint plus exactly one head file named ``*.pth`` or ``aesthetic*.safetensors``.
    Options: ``frames`` (default 8), ``clip``. The head's input width must equal CLIP's ``projection_dim``.
    """
    opts = check_options("aesthetic", options, {"frames": DEFAULT_FRAMES, "clip": None})
    what = "sac+logos+ava1-l14-linearMSE.pth (github christophschuhmann/improved-aesthetic-predictor)"
    if not path:
        raise VpoError(f"reward aesthetic needs --reward-path: the head file {what}, or a CLIP folder holding it")
    path = str(path)
    if not os.path.exists(path):
        raise VpoError(f"reward aesthetic: no head file or folder at {path}; pass --reward-path with {what}")
    if os.path.isdir(path):
        head_file, clip_path = _aesthetic_head_file(path), opts["clip"] or path
    else:
        head_file, clip_path = path, opts["clip"] or CLIP_ID
    sd = read_state_dict(head_file, "aesthetic", what)
    model = _clip_model(clip_path, CLIP_ID, "aesthetic", "a CLIP ViT-L/14 checkpoint folder", device, dtype)
    dim = model.config.projection_dim
    first = sd.get("layers.0.weight")
    if first is not None and first.ndim == 2 and first.shape[1] != dim:
        raise VpoError(
            f"reward aesthetic: the head in {head_file} takes {first.shape[1]}-wide embeddings but the CLIP model "
            f"gives {dim}; use a head trained on that CLIP (ViT-L/14: 768) or pass the matching CLIP with option clip"
        )
    head = AestheticMLP(dim)
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()
        detail = detail[1].strip() if len(detail) > 1 else detail[0]
        raise VpoError(
            f"reward aesthetic: {head_file} is not a LAION aesthetic head ({detail[:160]}); pass --reward-path with "
            f"{what}"
        ) from e
    head = freeze(head.to(device=model.device, dtype=torch.float32))
    return AestheticReward(model, head, opts["frames"])


def load_background(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> BackgroundReward:
    """VBench background consistency on CLIP image embeddings.

    ``path``: a transformers CLIP folder or hub id (default ``openai/clip-vit-base-patch32``, the ViT-B/32 VBench
    uses). Options: ``frames`` (default None: every frame, as VBench; a number compares evenly spaced frames, which
    are further apart, so scores drop). VBench resizes without antialiasing; here resizing is antialiased.
    """
    opts = check_options("background", options, {"frames": None})
    model = _clip_model(path, BACKGROUND_ID, "background", "a CLIP checkpoint folder", device, dtype)
    return BackgroundReward(model, opts["frames"])
