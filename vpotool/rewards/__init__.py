"""Reward registry: a plain dict from name to a factory ``(path, device, dtype, **options) -> Reward``.

A ``--reward`` value is either names scored separately (``world,flicker``: one score row each) or one weighted
composite (``videoscore:1.0,clip:0.5``: any ``:weight`` makes the whole value one reward; see ``composite.py``).
``--reward-path`` is one path (for the one model-based reward named) or ``name=path`` pairs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from vpotool.errors import VpoError
from vpotool.options import Option, check_declared, parse_value
from vpotool.rewards.base import Reward, check_frames
from vpotool.rewards.composite import CompositeReward, parse_weights
from vpotool.rewards.simple import BrightnessReward
from vpotool.rewards.temporal import DynamicsReward, FlickerReward, SmoothnessReward, TemporalReward
from vpotool.rewards.world import WorldReward

RewardFactory = Callable[..., Reward]


def _weight_free(cls) -> RewardFactory:
    def build(path=None, device="cpu", dtype=torch.float32, **options):
        return cls(**options)

    return build


def _lazy(target: str) -> RewardFactory:
    """A factory that imports ``"module:function"`` only when the reward is used (transformers loads slowly)."""

    def build(path=None, device="cpu", dtype=torch.float32, **options):
        module, fn = target.split(":")
        return getattr(importlib.import_module(module), fn)(path=path, device=device, dtype=dtype, **options)

    return build


_WEIGHT_FREE_CLASSES = {
    "flicker": FlickerReward,
    "smoothness": SmoothnessReward,
    "dynamics": DynamicsReward,
    "temporal": TemporalReward,
    "brightness": BrightnessReward,
    "world": WorldReward,
}
REWARDS: dict[str, RewardFactory] = {name: _weight_free(cls) for name, cls in _WEIGHT_FREE_CLASSES.items()}
WEIGHT_FREE = frozenset(REWARDS)


# Rewards that compare frames with each other: one frame gives every video the same score
TEMPORAL_REWARDS = ("flicker", "smoothness", "dynamics", "temporal", "world", "raft")


def temporal_parts(spec: str) -> list[str]:
    """The rewards of a ``--reward`` value (names or a weighted composite) that need at least 2 frames."""
    names = list(parse_weights(spec)) if ":" in spec else [n.strip() for n in spec.split(",")]
    return [n for n in names if n in TEMPORAL_REWARDS]


def check_reward_frames(spec: str, frames: int, what: str) -> None:
    """Refuse, in one line, a temporal reward on videos of fewer than 2 frames (``what`` says whose videos)."""
    temporal = temporal_parts(spec) if frames < 2 else []
    if temporal:
        raise VpoError(
            f"reward {temporal[0]} compares frames and needs videos of at least 2 frames; {what} has {frames}: "
            "pass --frames 2 or more, or a per-frame reward"
        )


def default_pair_margin(spec: str) -> float:
    """The score difference below which `loop` pairs no two candidates unless told: the reward's own
    ``pair_margin`` (a margin is on the reward's scale), 0 for a reward that declares none."""
    return float(getattr(_WEIGHT_FREE_CLASSES.get(spec), "pair_margin", 0.0))


REWARDS.update(
    {
        "videoscore": _lazy("vpotool.rewards.videoscore:load_videoscore"),
        "videoalign": _lazy("vpotool.rewards.videoalign:load_videoalign"),
        "clip": _lazy("vpotool.rewards.clip:load_clip"),
        "pickscore": _lazy("vpotool.rewards.clip:load_pickscore"),
        "aesthetic": _lazy("vpotool.rewards.clip:load_aesthetic"),
        "hpsv2": _lazy("vpotool.rewards.hpsv2:load_hpsv2"),
        "background": _lazy("vpotool.rewards.clip:load_background"),
        "subject": _lazy("vpotool.rewards.features:load_subject"),
        "vjepa": _lazy("vpotool.rewards.features:load_vjepa"),
        "raft": _lazy("vpotool.rewards.raft:load_raft"),
        "reference": _lazy("vpotool.rewards.reference:load_reference"),
        "videoscore2": _lazy("vpotool.rewards.videoscore2:load_videoscore2"),
    }
)


# The ``--reward-options`` each reward takes: default, type, smallest value, words, help. One table: the CLI checks
# options against it before any model loads, and the options table of docs/rewards.md is generated from it.
Opt = Option
FRAMES = Opt(8, "frames scored per video, evenly spaced", minimum=1)
ALL_FRAMES = Opt(None, "frames scored per video, evenly spaced (default: every frame)", int, minimum=1)
TEMPLATE = Opt(None, "upstream's prompt text: its script, model card or a text file (default: the folder's)", str)
QWEN_JUDGE = {
    "fps": Opt(2.0, "frames sampled a second of video", minimum=0.01),
    "max_new_tokens": Opt(1024, "the longest answer generated", minimum=1),
    "temperature": Opt(0.0, "0: greedy (deterministic); above 0 samples as upstream does at 0.7", minimum=0),
    "prompt_template": TEMPLATE,
}
REWARD_OPTIONS: dict[str, dict[str, Option]] = {
    "flicker": {},
    "smoothness": {},
    "dynamics": {"top_fraction": Opt(0.05, "share of the largest frame differences averaged, in (0, 1]", minimum=0)},
    "temporal": {
        "flicker": Opt(1.0, "weight of flicker in overall", minimum=0),
        "smoothness": Opt(1.0, "weight of smoothness in overall", minimum=0),
        "dynamics": Opt(0.5, "weight of dynamics in overall", minimum=0),
        "top_fraction": Opt(0.05, "dynamics' share of the largest frame differences, in (0, 1]", minimum=0),
    },
    "brightness": {},
    "world": {},
    "videoscore": {
        "frames": Opt(None, "frames per video (default: the model card's, 16 or 48)", int, minimum=1),
        "prompt_template": Opt(None, "a query template file (default: the model card's)", str),
        "frame_pick": Opt(None, "upstream's frame indices or evenly spaced ones", str, choices=("upstream", "spaced")),
    },
    "videoalign": {
        "vq": Opt(1.0, "weight of visual quality in overall", minimum=0),
        "mq": Opt(1.0, "weight of motion quality in overall", minimum=0),
        "ta": Opt(1.0, "weight of text alignment in overall", minimum=0),
        "norm": Opt(True, "normalise heads by the checkpoint's means and stds"),
        "fps": Opt(None, "frames sampled a second (default: the checkpoint's data_config)", float, minimum=0.01),
        "max_pixels": Opt(None, "pixel budget per frame (default: the checkpoint's)", int, minimum=1),
        "base": Opt(None, "the base Qwen2-VL folder (default: model_name_or_path)", str),
        "step": Opt(None, "which checkpoint-<step> (default: the last)", int, minimum=0),
        "prompt_template": TEMPLATE,
    },
    "clip": {"frames": FRAMES},
    "pickscore": {"frames": FRAMES, "tokenizer": Opt(None, "a tokenizer folder (default: the checkpoint's)", str)},
    "aesthetic": {"frames": FRAMES, "clip": Opt(None, "the CLIP ViT-L/14 folder the head reads", str)},
    "hpsv2": {
        "frames": FRAMES,
        "config": Opt(None, "a CLIPConfig folder or json (default: the folder's config.json, else ViT-H-14)", str),
        "tokenizer": Opt(None, "a tokenizer folder (default: the folder's, else laion's ViT-H-14)", str),
        "resize": Opt("pad", "pad (the hpsv2 package's letterbox) or crop", choices=("pad", "crop")),
    },
    "background": {"frames": ALL_FRAMES},
    "subject": {
        "size": Opt(None, "short side fed to DINO (default 224, as VBench)", int, minimum=1),
        "num_frames": ALL_FRAMES,
        "resize": Opt(None, "vbench (default) or bicubic", str, choices=("vbench", "bicubic")),
    },
    "vjepa": {"num_frames": Opt(None, "frames per clip (V-JEPA 2 only; default frames_per_clip)", int, minimum=1)},
    "raft": {
        "iters": Opt(20, "RAFT refinement steps (VBench: 20)", minimum=1),
        "pairs_per_batch": Opt(8, "frame pairs per RAFT call; bounds memory", minimum=1),
    },
    "reference": {
        "videos": Opt(None, "a folder of reference clips (required)", str),
        "k": Opt(5, "nearest reference features averaged", minimum=1),
    },
    "videoscore2": QWEN_JUDGE,
}
# The judge decodes as upstream does, with the checkpoint's generation config, unless told a temperature.
JUDGE_TEMPERATURE = Opt(None, "default: the checkpoint's generation config, as upstream; 0: greedy (repeatable "
                        "labels); above 0 samples at it", float, minimum=0)  # fmt: skip
JUDGE_OPTIONS: dict[str, dict[str, Option]] = {"unifiedreward-think": {**QWEN_JUDGE, "temperature": JUDGE_TEMPERATURE}}

# The checkpoint each model-based reward loads: what it is (for messages), and its default when --reward-path is not
# given (a hub id, "built-in", or None: --reward-path is required).
REWARD_CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "videoscore": ("a VideoScore checkpoint folder (v1 or v1.1)", "TIGER-Lab/VideoScore-v1.1"),
    "videoalign": ("a VideoReward checkpoint folder (KwaiVGI/VideoReward: model_config.json and checkpoint-*/)", None),
    "clip": ("a CLIP checkpoint folder", "openai/clip-vit-large-patch14"),
    "pickscore": ("the PickScore_v1 folder", "yuvalkirstain/PickScore_v1"),
    "aesthetic": ("the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth, or a CLIP folder holding it", None),
    "hpsv2": ("HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (hub xswu/HPSv2), or a folder holding it", None),
    "background": ("a CLIP checkpoint folder", "openai/clip-vit-base-patch32"),
    "subject": ("a DINO checkpoint folder (DINO ViT, DINOv2 or DINOv3)", "facebook/dino-vitb16"),
    "vjepa": ("a V-JEPA 2 or VideoMAE checkpoint folder", "facebook/vjepa2-vitl-fpc64-256"),
    "raft": ("RAFT weights (raft-things.pth from princeton-vl/RAFT, or a .safetensors of them)", None),
    "reference": ("a VideoMAE video classifier folder", "built-in"),
    "videoscore2": ("a VideoScore2 checkpoint folder (TIGER-Lab/VideoScore2, a Qwen2.5-VL)", None),
}


def declared_options(name: str) -> dict[str, Option]:
    """The ``--reward-options`` reward ``name`` takes: its ``REWARD_OPTIONS`` row; a reward registered in
    ``REWARDS`` without one takes none."""
    return REWARD_OPTIONS.get(name, {})


def _check_name(name: str) -> str:
    if name not in REWARDS:
        raise VpoError(f"unknown reward '{name}'; choose from: {', '.join(sorted(REWARDS))}")
    return name


def reward_names(spec: str) -> list[str]:
    """The rewards a ``--reward`` value scores with, each a name ``load_reward`` takes.

    ``"flicker,temporal"`` -> ``["flicker", "temporal"]``; a weighted composite such as ``"videoscore:1,clip:0.5"``
    is one reward, named by its canonical spec. Unknown names are a ``VpoError`` listing the known ones.
    """
    if ":" in spec:
        weights = parse_weights(spec)
        for n in weights:
            _check_name(n)
        return [",".join(f"{n}:{w:g}" for n, w in weights.items())]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise VpoError(f"--reward is empty; choose from: {', '.join(sorted(REWARDS))}")
    return [_check_name(n) for n in names]


def reward_path(paths: str | None, name: str, spec: str | None = None) -> str | None:
    """The weights ``--reward-path`` gives reward ``name``: from ``name=path`` pairs, or the single path when
    ``name`` is the only model-based reward in ``spec`` (weight-free rewards get None)."""
    if not paths or name in WEIGHT_FREE:
        return None
    if "=" in paths:
        pairs = dict(p.split("=", 1) for p in paths.split(",") if p.strip())
        pairs = {k.strip(): v.strip() for k, v in pairs.items()}
        for k in pairs:
            _check_name(k)
        return pairs.get(name)
    spec_names = list(parse_weights(spec)) if spec and ":" in spec else (spec or name).split(",")
    model_based = [n.strip() for n in spec_names if n.strip() and n.strip() not in WEIGHT_FREE]
    if len(model_based) > 1:
        raise VpoError(
            f"--reward-path {paths} is one path but {', '.join(model_based)} each need weights; "
            f"name them: --reward-path {model_based[0]}=DIR,{model_based[1]}=DIR"
        )
    return paths


# The dtype upstream runs a reward or judge in on a GPU where it is not float32 (``--dtype auto`` takes it there;
# on a CPU every model runs float32). VideoScore2's own inference script loads float32 and moves it to the GPU.
GPU_DTYPES = {"videoalign": torch.bfloat16, "unifiedreward-think": torch.bfloat16}


def resolve_dtype(dtype, name: str, device) -> torch.dtype:
    """A reward's or judge's dtype: ``dtype`` (a name or torch dtype), where ``"auto"`` is float32 on a CPU and
    on a GPU the dtype its upstream runs in there (``GPU_DTYPES``, else float32)."""
    if dtype == "auto":
        on_gpu = torch.device(device).type != "cpu"
        return GPU_DTYPES.get(name, torch.float32) if on_gpu else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def parse_options(text: str | None) -> dict[str, dict]:
    """``--reward-options`` -> per-reward keyword options: ``"videoscore.frames=16,clip.frames=8"`` ->
    ``{"videoscore": {"frames": 16}, "clip": {"frames": 8}}`` (numbers and true/false/none converted)."""
    out: dict[str, dict] = {}
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not (eq and dot and name and option):
            raise VpoError(
                f"--reward-options: '{item}' should look like reward.option=value, e.g. videoscore.frames=16"
            )
        out.setdefault(_check_name(name), {})[option.strip()] = parse_value(value.strip())
    return {n: check_declared("--reward-options", f"reward {n}", o, declared_options(n)) for n, o in out.items()}


def check_scored(spec: str, options: dict) -> None:
    """Refuse ``--reward-options`` for a reward that ``spec`` (the ``--reward`` value) does not score: such an
    option (a typo of the reward's name) would change nothing. The line lists the options that apply."""
    parts = set(parse_weights(spec)) if ":" in spec else set(reward_names(spec))
    stray = sorted(set(options) - parts)
    if stray:
        accepted = [f"{p}.{o}" for p in sorted(parts) for o in declared_options(p)]
        first = f"{stray[0]}.{next(iter(options[stray[0]]))}" if options[stray[0]] else stray[0]
        raise VpoError(
            f"--reward-options {first}: reward {stray[0]} is not in --reward {spec}; the options that apply here: "
            f"{', '.join(accepted) or 'none'}"
        )


def check_path(name: str, path: str | None) -> None:
    """Refuse, before any file inside is looked for, a model-based reward without the ``--reward-path`` it needs
    or with one that does not exist."""
    from vpotool.rewards.pretrained import looks_local

    what, default = REWARD_CHECKPOINTS.get(name, ("", "built-in"))
    if not path and default is None:
        raise VpoError(f"reward {name} needs --reward-path: {what}")
    if path and looks_local(str(path)) and not os.path.exists(str(path)):
        raise VpoError(f"reward {name}: --reward-path {path} does not exist; pass {what}")


def _build(name: str, paths, spec: str, device, dtype, options: dict) -> Reward:
    path = reward_path(paths, name, spec)
    if name not in WEIGHT_FREE:
        check_path(name, path)
    return REWARDS[name](path=path, device=device, dtype=resolve_dtype(dtype, name, device), **options.get(name, {}))


def load_reward(name: str, path: str | None = None, device="cpu", dtype=torch.float32, options=None, **kw) -> Reward:
    """Build one reward: a registry name or a weighted composite spec. ``path`` is the ``--reward-path`` value
    and ``options`` the ``--reward-options`` value (text or parsed), both resolved per reward; ``kw`` are options
    for a single named reward."""
    options = parse_options(options) if options is None or isinstance(options, str) else options
    check_scored(name, options)
    if ":" in name:
        weights = parse_weights(name)
        for n in weights:
            _check_name(n)
        return CompositeReward({n: _build(n, path, name, device, dtype, options) for n in weights}, weights)
    names = reward_names(name)
    if len(names) != 1:
        raise VpoError(
            f"--reward {name} names {len(names)} rewards but this stage optimises one; pick one, or weigh them into "
            f"one composite: --reward {':1,'.join(names)}:1"
        )
    kw = check_declared("--reward-options", f"reward {names[0]}", kw, declared_options(names[0]))
    return _build(names[0], path, names[0], device, dtype, {names[0]: {**options.get(names[0], {}), **kw}})


def load_rewards(spec: str, path=None, device="cpu", dtype=torch.float32, options=None, have=None) -> dict:
    """Every reward of a ``--reward`` value by name (see ``reward_names``), with ``--reward-path`` and
    ``--reward-options`` resolved against the whole value; rewards already in ``have`` are reused."""
    options = parse_options(options) if options is None or isinstance(options, str) else options
    check_scored(spec, options)
    have = {reward_names(k)[0]: v for k, v in (have or {}).items()}
    out = {}
    for n in reward_names(spec):
        if n in have:
            out[n] = have[n]
        elif ":" in n:
            out[n] = load_reward(n, path, device, dtype, options)
        else:
            out[n] = _build(n, path, spec, device, dtype, options)
    return out


__all__ = [
    "GPU_DTYPES",
    "JUDGE_OPTIONS",
    "REWARDS",
    "REWARD_CHECKPOINTS",
    "REWARD_OPTIONS",
    "Reward",
    "check_frames",
    "load_reward",
    "load_rewards",
    "parse_options",
    "reward_names",
    "reward_path",
]
