"""Feature-consistency rewards: VBench subject consistency on DINO image features (``subject``) and temporal
consistency on V-JEPA 2 or VideoMAE video features (``vjepa``).

Both turn a video into one feature vector per (temporal) position and score it with ``frame_similarity``, VBench's
consistency statistic. Preprocessing stays in torch, so both rewards pass gradients back to the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vpotool.errors import VpoError, first_line
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_options,
    frame_similarity,
    load_pretrained,
    normalize,
    pick_frames,
    read_json,
    resize_crop,
    weights_path,
)

DINO_ID = "facebook/dino-vitb16"  # VBench: torch.hub facebookresearch/dino dino_vitb16
VIDEO_ID = "facebook/vjepa2-vitl-fpc64-256"
DINO_WHAT = "a DINO checkpoint folder (a DINO ViT such as facebook/dino-vitb16, or DINOv2/DINOv3)"
VIDEO_WHAT = "a V-JEPA 2 or VideoMAE checkpoint folder"


def _config(path: str | None, default_id: str, reward: str, what: str, kinds: tuple[str, ...]):
    """The checkpoint's transformers config; a missing config or a ``model_type`` outside ``kinds`` is a VpoError."""
    from transformers import AutoConfig

    from vpotool.models.loading import quiet_loading

    path = weights_path(path, default_id, reward, what)
    quiet_loading()
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise VpoError(
            f"reward {reward}: could not read a config from {path}: {first} (pass --reward-path with {what})"
        ) from e
    if config.model_type not in kinds:
        raise VpoError(
            f"reward {reward}: {path} holds a '{config.model_type}' model, not one of {', '.join(kinds)}; "
            f"pass --reward-path with {what}"
        )
    return path, config


def _processor_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` and ``image_std`` from the checkpoint's (video) preprocessor config; ImageNet's if none.

    V-JEPA 2 and the MCG-NJU VideoMAE checkpoints ship ImageNet statistics, but VideoMAE's processor class defaults
    to 0.5/0.5, so the saved config decides.
    """
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        cfg = read_json(path, name)
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return images[..., top : top + size, left : left + size]


RESIZES = ("vbench", "bicubic")


def dino_resize(images: torch.Tensor, size: int, mode: str = "vbench") -> torch.Tensor:
    """The short side of float ``[N, 3, H, W]`` images to ``size``, keeping the aspect ratio, differentiably.

    ``vbench``: VBench's ``dino_transform`` (torchvision ``Resize(size, antialias=False)``): the long side becomes
    ``int(size * long / short)`` (truncated), bilinear without antialiasing. ``bicubic``: the long side rounded,
    bicubic and antialiased (vpotool's shared CLIP-style resize).
    """
    h, w = images.shape[-2:]
    if mode == "bicubic":
        scale = size / min(h, w)
        return resize_crop(images, (max(size, round(h * scale)), max(size, round(w * scale))), crop=False)
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    target = (size, new_long) if h <= w else (new_long, size)
    if target == (h, w):  # torchvision returns the image as it is
        return images
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=False)


class SubjectConsistencyReward:
    """VBench subject consistency: ``frame_similarity`` of each frame's DINO CLS feature.

    As in VBench (``subject_consistency.py`` with ``dino_transform(224)``): the short side goes to ``size`` keeping
    the aspect ratio (no crop; the ViT interpolates its position embeddings), ImageNet normalisation, and the CLS
    token after the final layer norm (what DINO's ``forward`` returns in VBench's torch.hub model). The resize is
    VBench's (bilinear, no antialiasing, long side truncated; see :func:`dino_resize`), on float frames where VBench
    resizes the decoded uint8 frames; ``resize="bicubic"`` takes the antialiased bicubic one instead.
    """

    name = "subject"
    differentiable = True
    dimensions = ("subject_consistency", "overall")
    score_range = (0.8, 1.0)  # VBench leaderboard models score about 0.88-0.98

    def __init__(self, model, size: int = 224, num_frames: int | None = None, resize: str = "vbench", device="cpu"):
        if resize not in RESIZES:
            raise VpoError(f"reward subject: option resize must be one of {', '.join(RESIZES)}; got {resize!r}")
        self.model, self.size, self.num_frames, self.device = model, size, num_frames, device
        self.resize = resize
        self.interpolate = model.config.model_type == "vit"  # the other DINO models always interpolate

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame CLS features: float ``[B, T, 3, H, W]`` in [0, 1] -> float32 ``[B, T', D]``."""
        frames = pick_frames(frames, self.num_frames)
        b, t = frames.shape[:2]
        x = dino_resize(frames.flatten(0, 1).float(), self.size, self.resize)
        x = normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(self.device, self.model.dtype)
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        cls = self.model(pixel_values=x, **kw).last_hidden_state[:, 0]
        return cls.float().view(b, t, -1)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = frame_similarity(self.features(frames))
        return {"subject_consistency": score, "overall": score}


def load_subject(path=None, device="cpu", dtype=torch.float32, **options) -> SubjectConsistencyReward:
    """The ``subject`` reward. Options: ``size`` (short side fed to DINO, default 224 as in VBench),
    ``num_frames`` (score that many evenly spaced frames; default all, as VBench) and ``resize`` (``vbench``, the
    default, or ``bicubic``; see :func:`dino_resize`)."""
    from transformers import AutoModel, ViTModel

    check_options("subject", options, dict.fromkeys(("size", "num_frames", "resize")))
    path, config = _config(
        path, DINO_ID, "subject", DINO_WHAT, ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")
    )
    # ViTModel's pooler (dense + tanh) is not part of DINO; leaving it out keeps its absence from counting as missing
    cls, kw = (ViTModel, {"add_pooling_layer": False}) if config.model_type == "vit" else (AutoModel, {})
    model = load_pretrained(cls, path, DINO_ID, "subject", DINO_WHAT, device=device, dtype=dtype, **kw)
    return SubjectConsistencyReward(model, device=device, **options)


class VideoConsistencyReward:
    """Temporal consistency from a video encoder: ``frame_similarity`` over tubelet features.

    The encoder (V-JEPA 2 or VideoMAE) turns a clip into patch tokens on a (time, height, width) grid, one time step
    per tubelet of ``tubelet_size`` frames. The tokens of each time step are mean-pooled, giving ``[B, T', D]``, and
    ``frame_similarity`` scores the steps as VBench scores per-frame DINO features: mean over steps of the clamped
    cosine similarity to the first and to the previous step. Why this definition: neither model has a CLS token, and
    mean pooling plays its part (the feature says what is shown more than where); each step's feature also encodes
    the motion inside its tubelet, which per-frame image features cannot; and using VBench's statistic keeps the
    score on the same footing as ``subject``. With V-JEPA 2 (relative RoPE positions) a still video scores about 1;
    VideoMAE adds absolute temporal position embeddings, which keep a still video below 1, so its scores compare
    only with each other.

    Clips: V-JEPA 2 takes ``frames_per_clip`` evenly spaced frames (all frames of a shorter video, trimmed to a
    multiple of the tubelet; it uses RoPE, so any length works); VideoMAE has fixed position embeddings and takes
    exactly ``num_frames``, repeating frames of a shorter video. Images follow each model's processor: V-JEPA 2
    resizes the short side to ``crop_size * 256 / 224`` and centre-crops ``crop_size``; VideoMAE resizes to and
    crops ``image_size``; mean and std come from the checkpoint's preprocessor config. (The processors resize
    bilinearly; the shared resize here is bicubic and antialiased.)
    """

    name = "vjepa"
    differentiable = True
    dimensions = ("temporal_consistency", "overall")
    score_range = (0.8, 1.0)  # mean-pooled features of neighbouring tubelets are strongly correlated

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_frames: int | None = None, device="cpu"):
        config = model.config
        self.model, self.mean, self.std, self.device = model, tuple(mean), tuple(std), device
        self.kind = config.model_type
        self.tubelet = config.tubelet_size
        if self.kind == "vjepa2":
            self.num_frames = num_frames or config.frames_per_clip
            self.crop, self.resize = config.crop_size, int(config.crop_size * 256 / 224)
        else:
            if num_frames not in (None, config.num_frames):
                raise VpoError(
                    f"reward vjepa: VideoMAE checkpoints take exactly {config.num_frames} frames (fixed position "
                    f"embeddings); drop the num_frames option"
                )
            self.num_frames = config.num_frames
            self.crop = self.resize = config.image_size
        if self.num_frames % self.tubelet:
            raise VpoError(f"reward vjepa: num_frames must be a multiple of the tubelet size {self.tubelet}")

    def clip(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames the encoder sees: ``[B, T, 3, H, W]`` -> ``[B, n, 3, H, W]`` (see the class docstring)."""
        t = frames.shape[1]
        if self.kind == "vjepa2" and t >= self.tubelet:
            frames = pick_frames(frames, self.num_frames)
            return frames[:, : frames.shape[1] // self.tubelet * self.tubelet]
        n = self.num_frames if self.kind != "vjepa2" else self.tubelet
        if t >= n:
            return pick_frames(frames, n)
        index = torch.linspace(0, t - 1, n, device=frames.device).round().long()
        return frames.index_select(1, index)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """Mean-pooled tokens per tubelet: float ``[B, T, 3, H, W]`` in [0, 1] -> float32 ``[B, T', D]``."""
        frames = self.clip(frames)
        b, n = frames.shape[:2]
        x = _center_crop(resize_crop(frames.flatten(0, 1).float(), self.resize), self.crop)
        x = normalize(x, self.mean, self.std).view(b, n, 3, self.crop, self.crop).to(self.device, self.model.dtype)
        if self.kind == "vjepa2":
            tokens = self.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        else:
            tokens = self.model(pixel_values=x).last_hidden_state
        # both models flatten their patch grid time-major: (time, height, width)
        return tokens.float().view(b, n // self.tubelet, -1, tokens.shape[-1]).mean(2)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = frame_similarity(self.features(frames))
        return {"temporal_consistency": score, "overall": score}


def load_vjepa(path=None, device="cpu", dtype=torch.float32, **options) -> VideoConsistencyReward:
    """The ``vjepa`` reward on a V-JEPA 2 (default ``facebook/vjepa2-vitl-fpc64-256``) or VideoMAE checkpoint,
    told apart by the config's ``model_type``. Option: ``num_frames`` (V-JEPA 2 only; default ``frames_per_clip``)."""
    from transformers import VideoMAEModel, VJEPA2Model

    check_options("vjepa", options, dict.fromkeys(("num_frames",)))
    path, config = _config(path, VIDEO_ID, "vjepa", VIDEO_WHAT, ("vjepa2", "videomae"))
    cls = VJEPA2Model if config.model_type == "vjepa2" else VideoMAEModel
    model = load_pretrained(cls, path, VIDEO_ID, "vjepa", VIDEO_WHAT, device=device, dtype=dtype)
    mean, std = _processor_stats(path)
    return VideoConsistencyReward(model, mean, std, device=device, **options)
