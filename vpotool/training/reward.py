"""The reward side of the online trainers (train-refl, train-scst, loop): the training reward on its device, the
frames it sees, and its values for a batch."""

from __future__ import annotations

import torch

from vpotool.errors import VpoError


def frame_index(t: int, spec: str) -> list[int]:
    """Indices of the frames a reward sees of ``t``: ``all``, ``N`` evenly spaced, or ``first-middle-last``."""
    if spec == "all":
        return list(range(t))
    if spec == "first-middle-last":
        return sorted({0, t // 2, t - 1})
    return torch.linspace(0, t - 1, min(int(spec), t)).round().long().tolist()


def select_frames(frames: torch.Tensor, spec: str) -> torch.Tensor:
    """The frames a reward sees (see :func:`frame_index`); ``[B, T, C, H, W]``."""
    return frames if spec == "all" else frames[:, frame_index(frames.shape[1], spec)]


def selected_fps(fps: float, t: int, spec: str) -> float:
    """The frame rate of the frames :func:`select_frames` keeps of ``t`` frames at ``fps``, from their mean
    spacing: ``fps`` for ``all``, ``fps * (n - 1) / (t - 1)`` for ``n`` kept frames (``fps`` for one)."""
    n = len(frame_index(t, spec))
    return fps if n < 2 else fps * (n - 1) / (t - 1)


def load_rollout_reward(cfg, device, need_grad: bool):
    """The training reward, on ``cfg.reward_device`` when set, else ``device``; reward-gradient training refuses a
    non-differentiable one."""
    from vpotool.rewards import load_reward

    device = getattr(cfg, "reward_device", None) or device
    reward = load_reward(cfg.reward, cfg.reward_path, device, options=cfg.reward_options)
    if need_grad and not reward.differentiable:
        raise VpoError(f"reward '{cfg.reward}' is not differentiable; train-refl needs one (e.g. temporal, flicker)")
    if cfg.reward_dimension not in reward.dimensions:
        known = ", ".join(reward.dimensions)
        raise VpoError(f"reward '{cfg.reward}' has no dimension '{cfg.reward_dimension}'; choose from: {known}")
    return reward


def reward_values(reward, frames: torch.Tensor, prompts: list[str], cfg, fps: float | None) -> torch.Tensor:
    """``cfg.reward_dimension`` of ``reward`` on float ``frames`` at ``fps`` (the rate the videos are generated at,
    as ``sample`` writes them and ``score`` passes it), computed on ``cfg.reward_device`` when set and returned on
    the frames' device (gradients cross the devices)."""
    from vpotool.rewards.base import call_reward

    device = getattr(cfg, "reward_device", None)
    x = frames.float() if device is None else frames.float().to(device)
    return call_reward(reward, x, prompts, fps)[cfg.reward_dimension].to(frames.device)
