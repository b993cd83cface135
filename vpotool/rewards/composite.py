"""Weighted composite rewards (``--reward videoscore:1.0,clip:0.5``): each part's ``overall`` is normalised by
its documented typical range, then averaged with the weights.

The normalisation is fixed per reward (``score_range``), not fitted to the batch, so a composite score means the
same thing in every batch, shard and run, and stays differentiable.
"""

from __future__ import annotations

import math

import torch

from vpotool.errors import VpoError
from vpotool.rewards.base import call_reward, check_frames


def parse_weights(spec: str) -> dict[str, float]:
    """``"videoscore:1.0,clip:0.5"`` -> ``{"videoscore": 1.0, "clip": 0.5}``; a part without ``:w`` weighs 1.

    Weights must be finite and >= 0 with a positive sum; a name may appear once.
    """
    weights: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, w = item.partition(":")
        name = name.strip()
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise VpoError(f"--reward {spec}: '{w}' is not a number; write weights as name:0.5") from None
        if not math.isfinite(weight) or weight < 0:
            raise VpoError(f"--reward {spec}: the weight of {name} must be a finite number >= 0")
        if name in weights:
            raise VpoError(f"--reward {spec} names {name} twice; give each reward once")
        weights[name] = weight
    if not weights or sum(weights.values()) <= 0:
        raise VpoError(f"--reward {spec}: give at least one reward with a positive weight")
    return weights


def normalized(values: torch.Tensor, score_range: tuple[float, float]) -> torch.Tensor:
    """Map a reward's ``overall`` from its typical range ``(lo, hi)`` to about [0, 1]: ``(v - lo) / (hi - lo)``.

    Not clamped, so a video outside the typical range still ranks (and passes gradients) correctly.
    """
    lo, hi = score_range
    return (values.float() - lo) / (hi - lo)


class CompositeReward:
    """Several rewards as one: dimensions ``part.dimension`` for every part, ``overall`` the weighted mean of the
    parts' normalised ``overall`` (see ``normalized``). Differentiable when every weighted part is."""

    score_range = (0.0, 1.0)

    def __init__(self, parts: dict, weights: dict[str, float]):
        self.parts, self.weights = parts, weights
        self.name = ",".join(f"{n}:{w:g}" for n, w in weights.items())
        self.differentiable = all(p.differentiable for n, p in parts.items() if weights[n] > 0)
        self.takes_fps = any(getattr(p, "takes_fps", False) for p in parts.values())
        self.dimensions = tuple(f"{n}.{d}" for n, p in parts.items() for d in p.dimensions) + ("overall",)
        self.device = next((p.device for p in parts.values() if hasattr(p, "device")), None)
        for n, p in parts.items():
            lo, hi = p.score_range
            if not hi > lo:
                raise VpoError(f"reward {n} declares an empty score_range {(lo, hi)}; it cannot be weighted")

    def describe(self) -> dict:
        """Weights and normalisation ranges, for the scores manifest's metadata."""
        return {n: {"weight": w, "range": list(self.parts[n].score_range)}
                for n, w in self.weights.items()}  # fmt: skip

    def __call__(self, frames: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        out, total = {}, 0.0
        for n, part in self.parts.items():
            device = getattr(part, "device", None)
            dims = call_reward(part, frames.to(device) if device is not None else frames, prompts, fps)
            for d, v in dims.items():
                out[f"{n}.{d}"] = v.float().to(frames.device)
            if self.weights[n] > 0:
                rng = part.score_range
                total = total + self.weights[n] * normalized(out[f"{n}.overall"], rng)
        out["overall"] = total / sum(self.weights.values())
        return out
