"""Simple differentiable pixel statistics, useful to check that reward-driven training moves what it should."""

from __future__ import annotations

import torch

from vpotool.rewards.base import check_frames


class BrightnessReward:
    """Mean pixel intensity of the video in [0, 1]: a transparent target for sanity checks and tests."""

    name = "brightness"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("brightness", "overall")

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        value = frames.float().flatten(1).mean(1)
        return {"brightness": value, "overall": value}
