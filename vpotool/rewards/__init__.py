"""Reward registry: a plain dict from name to a factory ``(path, device, dtype, **options) -> Reward``.

A ``--reward`` value is either names scored separately (``world,flicker``: one score row each) or one weighted
composite (``videoscore:1.0,clip:0.5``: any ``:weight`` makes the whole value one reward; see ``composite.py``).
``--reward-path`` is one path (for the one model-based reward named) or ``name=path`` pairs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from vpotool.errors import VpoError
from vpotool.options import parse_value
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


def _dtype(dtype):
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
    return out


def _build(name: str, paths, spec: str, device, dtype, options: dict) -> Reward:
    return REWARDS[name](
        path=reward_path(paths, name, spec), device=device, dtype=_dtype(dtype), **options.get(name, {})
    )


def load_reward(name: str, path: str | None = None, device="cpu", dtype=torch.float32, options=None, **kw) -> Reward:
    """Build one reward: a registry name or a weighted composite spec. ``path`` is the ``--reward-path`` value
    and ``options`` the ``--reward-options`` value (text or parsed), both resolved per reward; ``kw`` are options
    for a single named reward."""
    options = parse_options(options) if options is None or isinstance(options, str) else options
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
    return _build(names[0], path, names[0], device, dtype, {names[0]: {**options.get(names[0], {}), **kw}})


def load_rewards(spec: str, path=None, device="cpu", dtype=torch.float32, options=None, have=None) -> dict:
    """Every reward of a ``--reward`` value by name (see ``reward_names``), with ``--reward-path`` and
    ``--reward-options`` resolved against the whole value; rewards already in ``have`` are reused."""
    options = parse_options(options) if options is None or isinstance(options, str) else options
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
    "REWARDS",
    "Reward",
    "check_frames",
    "load_reward",
    "load_rewards",
    "parse_options",
    "reward_names",
    "reward_path",
]
