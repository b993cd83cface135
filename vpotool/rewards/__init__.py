"""Reward registry: a plain dict from name to a factory ``(path, device, dtype, **options) -> Reward``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vpotool.errors import VpoError
from vpotool.rewards.base import Reward, check_frames
from vpotool.rewards.simple import BrightnessReward
from vpotool.rewards.temporal import DynamicsReward, FlickerReward, SmoothnessReward, TemporalReward
from vpotool.rewards.world import WorldReward

RewardFactory = Callable[..., Reward]

REWARDS: dict[str, RewardFactory] = {
    "flicker": lambda path=None, device="cpu", dtype=torch.float32, **kw: FlickerReward(**kw),
    "smoothness": lambda path=None, device="cpu", dtype=torch.float32, **kw: SmoothnessReward(**kw),
    "dynamics": lambda path=None, device="cpu", dtype=torch.float32, **kw: DynamicsReward(**kw),
    "temporal": lambda path=None, device="cpu", dtype=torch.float32, **kw: TemporalReward(**kw),
    "brightness": lambda path=None, device="cpu", dtype=torch.float32, **kw: BrightnessReward(**kw),
    "world": lambda path=None, device="cpu", dtype=torch.float32, **kw: WorldReward(**kw),
}


def reward_names(spec: str) -> list[str]:
    """Split a ``--reward`` value such as ``"flicker,temporal"`` into names, checking each is known."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise VpoError(f"--reward is empty; choose from: {', '.join(sorted(REWARDS))}")
    for n in names:
        if n not in REWARDS:
            raise VpoError(f"unknown reward '{n}'; choose from: {', '.join(sorted(REWARDS))}")
    return names


def load_reward(name: str, path: str | None = None, device: str = "cpu", dtype=torch.float32, **options) -> Reward:
    """Build the reward registered under ``name`` (weights, if any, from ``path``)."""
    reward_names(name)
    return REWARDS[name](path=path, device=device, dtype=dtype, **options)


__all__ = ["REWARDS", "Reward", "check_frames", "load_reward", "reward_names"]
