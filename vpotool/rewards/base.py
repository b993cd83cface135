"""The reward protocol: frames and prompts in, named per-video scores out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    """A video reward.

    ``__call__(frames, prompts)`` takes ``frames`` as float in [0, 1] shaped ``[B, T, C, H, W]``
    (C = 3, RGB) and ``prompts`` as a list of B strings, and returns a dict of named dimensions,
    each a float tensor ``[B]``, with ``"overall"`` always present. Higher is better for every
    dimension. A reward with ``differentiable = True`` lets gradients flow back to ``frames``.
    ``score_range`` is the typical ``(low, high)`` of ``overall``; weighted composites normalise by it.
    """

    name: str
    differentiable: bool
    dimensions: tuple[str, ...]
    score_range: tuple[float, float]

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]: ...


def call_reward(reward, frames: torch.Tensor, prompts: list[str], fps: float | None) -> dict[str, torch.Tensor]:
    """``reward(frames, prompts)``, with ``fps`` (the frame rate ``frames`` are at) passed to a reward that takes it
    (``takes_fps``: raft's VBench frame stride depends on it). The one call of ``score``, the trainers and
    composites, so that a trained reward is the scored one."""
    extra = {"fps": fps} if getattr(reward, "takes_fps", False) else {}
    return reward(frames, prompts, **extra)


def check_frames(frames: torch.Tensor, prompts: list[str]) -> None:
    """Validate the reward input contract; raises ValueError naming what is off."""
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"rewards take frames [B, T, 3, H, W]; got shape {tuple(frames.shape)}")
    if len(prompts) != frames.shape[0]:
        raise ValueError(f"got {frames.shape[0]} videos but {len(prompts)} prompts")
    if not frames.is_floating_point():
        raise ValueError(f"rewards take float frames in [0, 1]; got dtype {frames.dtype}")
