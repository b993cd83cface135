"""Video features compared with a folder of reference videos that are not paired with prompts: the ``reference``
reward (how close each video comes to the reference clips) and the FVD of ``eval --fvd-reference``.

Two feature spaces, one per kind of model:

- ``world``: the tiny world's weight-free clip features (:func:`vpotool.world.features.clip_features`), for the
  built-in models and clips rendered by the world;
- a VideoMAE video classifier from a local folder (``--reward-path`` / ``eval --fvd-model``), as content-debiased
  FVD embeds clips (Ge et al., CVPR 2024, the ``cd-fvd`` package): the first ``num_frames`` frames of a video, RGB in
  [0, 1] resized bilinearly (no antialiasing) to the model's square input, *not* mean/std normalised, and the
  classifier's pooled feature ``fc_norm(mean of the last layer's tokens)`` (the mean alone for a checkpoint without
  ``fc_norm``). cd-fvd loads VideoMAE-v2 ViT-g (SSv2 fine-tuned) through its own code; any transformers VideoMAE
  classifier folder goes through the same steps here.

Each video is cut into windows of the reference clips' length (the shortest reference video; windows overlap by one
frame, as the tiny world's 17-frame segments do), so long videos compare with short references window by window.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from vpotool.errors import VpoError
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import check_options, load_pretrained

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
VIDEOMAE_WHAT = "a VideoMAE video classifier folder (transformers VideoMAEForVideoClassification)"


class WorldEmbedder:
    """The tiny world's clip features: any clip length, no weights."""

    name = "world"
    clip_frames = None  # any

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        from vpotool.world.features import clip_features

        return clip_features(frames)


class VideoMAEEmbedder:
    """cd-FVD's VideoMAE features of float frames ``[B, T, 3, H, W]`` in [0, 1] (see the module docstring)."""

    name = "videomae"
    own_size = True  # resizes every clip to the model's input

    def __init__(self, model, device="cpu"):
        self.model, self.device = model, device
        self.clip_frames = model.config.num_frames
        self.size = model.config.image_size

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        if t < self.clip_frames:
            raise VpoError(f"VideoMAE features need {self.clip_frames} frames; these videos have {t}")
        x = frames[:, : self.clip_frames].flatten(0, 1).float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x.view(b, self.clip_frames, 3, self.size, self.size).to(self.device, self.model.dtype)
        tokens = self.model.videomae(pixel_values=x).last_hidden_state.mean(1)
        norm = getattr(self.model, "fc_norm", None)
        return (norm(tokens) if norm is not None else tokens).float().cpu()


def load_embedder(path: str | None, device="cpu", dtype=torch.float32, what: str = "--reward-path"):
    """The world's features without ``path``; else the VideoMAE classifier in folder ``path``."""
    if not path:
        return WorldEmbedder()
    from transformers import VideoMAEForVideoClassification

    model = load_pretrained(VideoMAEForVideoClassification, path, path, "reference", VIDEOMAE_WHAT, device, dtype)
    if model.config.model_type != "videomae":
        raise VpoError(f"{what} {path} holds a '{model.config.model_type}' model; pass {VIDEOMAE_WHAT}")
    return VideoMAEEmbedder(model.eval(), device)


def windows(frames: torch.Tensor, length: int | None) -> tuple[torch.Tensor, int]:
    """``[B, T, ...]`` -> ``([B * W, length, ...], W)``: W windows of ``length`` frames per video, overlapping by one
    frame, the last ending at the video's end; the whole video (W = 1) when ``length`` is None or longer."""
    t = frames.shape[1]
    if length is None or t <= length:
        return frames, 1
    starts = list(range(0, t - length + 1, length - 1)) if length > 1 else list(range(t))
    if starts[-1] + length < t:
        starts.append(t - length)
    return torch.stack([frames[:, s : s + length] for s in starts], 1).flatten(0, 1), len(starts)


def reference_videos(folder: str | Path) -> list[torch.Tensor]:
    """Every video in ``folder`` as float ``[T, 3, H, W]`` in [0, 1]; an empty, missing or unreadable folder is a
    one-line ``VpoError``."""
    from vpotool.video import frames_to_tensor, read_video

    folder = Path(folder)
    if not folder.is_dir():
        raise VpoError(f"reference videos: {folder} is not a folder (pass a folder of .mp4 clips)")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    except OSError as e:
        raise VpoError(f"reference videos: cannot read {folder} ({e.strerror})") from e
    if not files:
        raise VpoError(f"reference videos: {folder} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    return [frames_to_tensor(read_video(p)) for p in files]


class ReferenceSet:
    """Reference clips and their features in one feature space, embedded once per video size: every window of each
    clip, the window length being the shortest clip's (or the embedder's clip length). Features computed at the
    videos' own size (the world's) get the references resized to it; an embedder that resizes its input itself
    (``own_size``, VideoMAE) embeds them as they are."""

    def __init__(self, embed, videos: list[torch.Tensor]):
        self.embed, self.videos = embed, videos
        self.length = embed.clip_frames or min(v.shape[0] for v in videos)
        if min(v.shape[0] for v in videos) < self.length:
            raise VpoError(
                f"reference videos: {embed.name} features need clips of {self.length} frames; some are shorter"
            )
        self._features: dict = {}

    def features(self, height: int, width: int) -> torch.Tensor:
        """``[N, D]``: the references' window features for videos of ``height x width``."""
        size = None if getattr(self.embed, "own_size", False) else (height, width)
        if size not in self._features:
            feats = []
            for v in self.videos:
                if size and v.shape[-2:] != size:
                    v = F.interpolate(v, size=size, mode="bilinear", align_corners=False, antialias=True)
                feats.append(self.embed(windows(v[None], self.length)[0]))
            self._features[size] = torch.cat(feats)
        return self._features[size]

    def video_features(self, frames: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``([B * W, D], W)``: the features of each video's W windows of the references' length."""
        clips, n = windows(frames.detach().float().cpu(), self.length)
        return self.embed(clips), n


class ReferenceReward:
    """How close each video comes to a set of reference clips, with no prompt involved: minus the mean distance of
    its features to their ``k`` nearest reference features, in units of the reference clips' own typical distance
    (the median over reference clips of the same statistic, each left out of its own neighbours), so a clip like
    the references scores about -1. Features are standardised per dimension by the references' spread; a video
    longer than the references is scored window by window and averaged. Not differentiable."""

    name = "reference"
    differentiable = False
    dimensions = ("closeness", "overall")
    score_range = (-3.0, -0.5)

    def __init__(self, embed, videos: list[torch.Tensor], k: int = 5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VpoError(f"reward reference: option k must be a positive integer; got {k!r}")
        self.references, self.k = ReferenceSet(embed, videos), int(k)
        self._ref: dict = {}  # (height, width) -> (mean, std, standardised features, scale)

    def reference(self, height: int, width: int):
        if (height, width) not in self._ref:
            feats = self.references.features(height, width)
            mean, std = feats.mean(0), feats.std(0, correction=0).clamp(min=1e-6)
            z = (feats - mean) / std
            if z.shape[0] < 2:
                raise VpoError("reward reference: needs at least 2 reference clips (windows) to set its scale")
            d = torch.cdist(z, z).fill_diagonal_(math.inf)
            k = min(self.k, z.shape[0] - 1)
            scale = d.topk(k, largest=False).values.mean(1).median().clamp(min=1e-6)
            self._ref[(height, width)] = (mean, std, z, scale)
        return self._ref[(height, width)]

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        b, _, _, h, w = frames.shape
        mean, std, z, scale = self.reference(h, w)
        feats, n = self.references.video_features(frames)
        mine = (feats - mean) / std
        k = min(self.k, z.shape[0])
        near = torch.cdist(mine, z).topk(k, largest=False).values.mean(1)
        score = -(near / scale).view(b, n).mean(1)
        return {"closeness": score, "overall": score}


def load_reference(path=None, device="cpu", dtype=torch.float32, **options) -> ReferenceReward:
    """The ``reference`` reward. Options: ``videos`` (a folder of reference clips, required) and ``k`` (neighbours,
    default 5). ``--reward-path``: a VideoMAE classifier folder for its features (default: the tiny world's)."""
    options = check_options("reference", options, {"videos": None, "k": 5})
    if not options["videos"]:
        raise VpoError("reward reference needs its reference clips: --reward-options reference.videos=DIR")
    videos = reference_videos(str(options["videos"]))
    return ReferenceReward(load_embedder(path, device, dtype), videos, options["k"])
