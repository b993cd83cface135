"""The reward side of the online trainers (train-refl, train-scst, loop): the training reward on its device, the
frames it sees, and its values for a batch."""

from __future__ import annotations

import torch

from vpotool.errors import VpoError


def select_frames(frames: torch.Tensor, spec: str) -> torch.Tensor:
    """The frames a reward sees: ``all``, ``N`` evenly spaced, or ``first-middle-last``; ``[B, T, C, H, W]``."""
    t = frames.shape[1]
    if spec == "all":
        return frames
    if spec == "first-middle-last":
        idx = sorted({0, t // 2, t - 1})
    else:
        n = min(int(spec), t)
        idx = torch.linspace(0, t - 1, n).round().long().tolist()
    return frames[:, idx]


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


def reward_values(reward, frames: torch.Tensor, prompts: list[str], cfg) -> torch.Tensor:
    """``cfg.reward_dimension`` of ``reward`` on float ``frames``, computed on ``cfg.reward_device`` when set and
    returned on the frames' device (gradients cross the devices)."""
    device = getattr(cfg, "reward_device", None)
    x = frames.float() if device is None else frames.float().to(device)
    return reward(x, prompts)[cfg.reward_dimension].to(frames.device)
