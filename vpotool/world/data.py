"""The tiny model's pretraining data: rendered world clips with a known share of imperfections.

Real video data is noisy: captions that misdescribe the clip, clips that flicker, stutter or stand still. The
tiny model is pretrained on such a mix on purpose, so that it has defects of measured rates for alignment to
lower. :data:`DATA_MIX` is the recipe; :func:`training_example` draws one (caption, clip) from it.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from vpotool.world.grammar import COLORS, DIRECTIONS, WorldPrompt
from vpotool.world.render import motion_path, paint_clip

# Share of each kind of pretraining example (they sum to 1). The caption is the prompt's text unless the kind
# says it lies; the clip is the rendered ground truth unless the kind alters it.
DATA_MIX: dict[str, float] = {
    "clean": 0.60,
    "wrong_direction": 0.15,  # caption names another direction than the clip moves in
    "wrong_color": 0.05,  # caption names another colour than the shape has
    "static": 0.10,  # the shape stands still at its start point
    "stutter": 0.05,  # the shape moves in steps: every position is held for two frames
    "flicker": 0.05,  # every other frame the shape fades halfway into the background
}


def defect_clip(prompt: WorldPrompt, kind: str, frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The clip of ``prompt`` altered by ``kind`` (a key of :data:`DATA_MIX`): float ``[T, 3, H, W]``."""
    path = motion_path(prompt, frames, height, width, seed)
    opacity = torch.ones(frames)
    if kind == "static":
        path = path[:1].expand(frames, 2)
    elif kind == "stutter":
        path = path[(torch.arange(frames) // 2) * 2]
    elif kind == "flicker":
        opacity[1::2] = 0.5
    return paint_clip(prompt, path, height, width, opacity)


def lying_caption(prompt: WorldPrompt, kind: str, rng: random.Random) -> WorldPrompt:
    """The prompt a caption of ``kind`` states for a clip of ``prompt``: another direction or colour, or itself."""
    if kind == "wrong_direction":
        return replace(prompt, direction=rng.choice([d for d in DIRECTIONS if d != prompt.direction]))
    if kind == "wrong_color":
        others = [c for c in COLORS if c not in (prompt.color, prompt.background)]
        return replace(prompt, color=rng.choice(others))
    return prompt


def training_example(
    prompt: WorldPrompt, rng: random.Random, frames: int, height: int, width: int
) -> tuple[str, torch.Tensor, str]:
    """One pretraining example for ``prompt``: ``(caption, clip [T, 3, H, W], kind)``, the kind drawn from
    :data:`DATA_MIX` and the placement from ``rng``."""
    kind = rng.choices(list(DATA_MIX), weights=list(DATA_MIX.values()))[0]
    clip = defect_clip(prompt, kind, frames, height, width, rng.randrange(2**31))
    return lying_caption(prompt, kind, rng).text, clip, kind
