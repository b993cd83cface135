"""Weight-free temporal rewards (flicker, motion smoothness, dynamics) after the VBench definitions.

All math lives in pure functions on float frames so every score stays differentiable; the reward classes are thin.
"""

from __future__ import annotations

import torch

from vpotool.errors import VpoError
from vpotool.rewards.base import check_frames


def _ones(frames: torch.Tensor) -> torch.Tensor:
    return torch.ones(frames.shape[0], dtype=torch.float32, device=frames.device)


def _check_top_fraction(top_fraction: float) -> float:
    if not 0.0 < top_fraction <= 1.0:
        raise VpoError(f"dynamics top_fraction must be in (0, 1]; got {top_fraction}")
    return top_fraction


def flicker_score(frames: torch.Tensor) -> torch.Tensor:
    """VBench temporal flickering on [0, 1] frames: ``1 - mean_i mean|f_{i+1} - f_i|``.

    Equals ``(255 - MAE_255) / 255`` without quantising to uint8, so gradients flow.
    frames: float ``[B, T, C, H, W]`` in [0, 1]. Returns float32 ``[B]`` in [0, 1]; 1.0 when T < 2 (no pairs).
    """
    if frames.shape[1] < 2:
        return _ones(frames)
    diff = (frames[:, 1:] - frames[:, :-1]).abs()
    return 1.0 - diff.float().mean(dim=(1, 2, 3, 4))


def smoothness_score(frames: torch.Tensor) -> torch.Tensor:
    """Motion smoothness: rebuild each odd frame as the average of its even neighbours; ``1 - MAE``.

    VBench uses a learned frame interpolator; the linear blend is the weight-free stand-in. Odd frames without a
    right neighbour (the last one when T is even) are skipped.
    frames: float ``[B, T, C, H, W]`` in [0, 1]. Returns float32 ``[B]`` in [0, 1]; 1.0 when T < 3, since there is
    no odd frame with two neighbours to interpolate.
    """
    t = frames.shape[1]
    if t < 3:
        return _ones(frames)
    before, actual, after = frames[:, 0 : t - 2 : 2], frames[:, 1 : t - 1 : 2], frames[:, 2:t:2]
    rebuilt = 0.5 * (before + after)
    return 1.0 - (rebuilt - actual).abs().float().mean(dim=(1, 2, 3, 4))


def dynamics_score(frames: torch.Tensor, top_fraction: float = 0.05) -> torch.Tensor:
    """Motion magnitude without a flow network: the mean of the top ``top_fraction`` frame-difference pixels.

    Per consecutive pair, the per-pixel change is ``mean_c |f_{i+1} - f_i|`` (in [0, 1]); the score is the mean of
    its largest ``top_fraction`` values (at least one pixel), averaged over pairs. This mirrors VBench's "mean of
    the top 5% of flow magnitudes" but measures intensity change instead of displacement, so a small moving object
    still scores high while a whole-frame average would dilute it. Top-k passes gradients to the selected pixels;
    there is no threshold. It does not tell motion from flicker or noise: pair it with ``flicker_score``.
    frames: float ``[B, T, C, H, W]`` in [0, 1]. Returns float32 ``[B]`` in [0, 1]; 0.0 when T < 2 (a static video
    scores 0).
    """
    b, t = frames.shape[:2]
    if t < 2:
        return torch.zeros(b, dtype=torch.float32, device=frames.device)
    change = (frames[:, 1:] - frames[:, :-1]).abs().float().mean(dim=2).flatten(2)  # [B, T-1, H*W]
    k = max(1, round(top_fraction * change.shape[-1]))
    return change.topk(k, dim=-1).values.mean(dim=(1, 2))


class FlickerReward:
    """VBench temporal flickering; higher means steadier frames. See ``flicker_score``."""

    name = "flicker"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("flicker", "overall")

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = flicker_score(frames)
        return {"flicker": score, "overall": score}


class SmoothnessReward:
    """Motion smoothness by linear interpolation of odd frames. See ``smoothness_score``."""

    name = "smoothness"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("smoothness", "overall")

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = smoothness_score(frames)
        return {"smoothness": score, "overall": score}


class DynamicsReward:
    """Dynamic degree as a soft [0, 1] motion magnitude. See ``dynamics_score``."""

    name = "dynamics"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("dynamic_degree", "overall")

    def __init__(self, top_fraction: float = 0.05):
        self.top_fraction = _check_top_fraction(top_fraction)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        score = dynamics_score(frames, self.top_fraction)
        return {"dynamic_degree": score, "overall": score}


class TemporalReward:
    """Flicker, smoothness and dynamics together; ``overall`` is their weighted mean.

    The defaults (flicker 1, smoothness 1, dynamics 0.5) favour temporally stable video, yet a frozen video loses
    the dynamics share (overall 0.8 instead of near 1), so the optimum is steady motion rather than a still image.
    Dynamics weighs less because it alone also rewards noise and flashing, which the other two penalise.
    """

    name = "temporal"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("flicker", "smoothness", "dynamic_degree", "overall")

    def __init__(
        self, flicker: float = 1.0, smoothness: float = 1.0, dynamics: float = 0.5, top_fraction: float = 0.05
    ):
        weights = {"flicker": flicker, "smoothness": smoothness, "dynamics": dynamics}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise VpoError(f"temporal weights must be >= 0 with a positive sum; got {weights}")
        self.weights = weights
        self.top_fraction = _check_top_fraction(top_fraction)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        out = {
            "flicker": flicker_score(frames),
            "smoothness": smoothness_score(frames),
            "dynamic_degree": dynamics_score(frames, self.top_fraction),
        }
        w = self.weights
        total = w["flicker"] * out["flicker"] + w["smoothness"] * out["smoothness"]
        out["overall"] = (total + w["dynamics"] * out["dynamic_degree"]) / sum(w.values())
        return out
