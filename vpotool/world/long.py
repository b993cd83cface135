"""Long clips of the tiny world, for autoregressive models: the motion goes on past the world's clip length.

A world clip of 17 frames crosses ``SPEEDS[speed]`` of the frame; a long clip keeps that per-frame velocity for
any number of frames, and a shape that leaves the frame on one side comes back on the other (the frame is a
torus). The first 17 frames of a long clip are the world clip of the same prompt and seed, so a model taught on
world clips has seen how every long clip starts.

:func:`segment_checks` cuts a long clip into segments of the world's clip length and runs the world's defect
checks on each, with positions measured around the torus: the drift curve of an autoregressive rollout.
"""

from __future__ import annotations

import torch

from vpotool.world.grammar import BACKGROUNDS, COLORS, WorldPrompt
from vpotool.world.rates import BASE_FRAMES, _clip_checks
from vpotool.world.render import motion_path, shape_radius, wrapped_coverage


def long_path(prompt: WorldPrompt, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Centres ``[T, 2]`` (x, y pixels, within the frame) of a long clip: the world clip's start and per-frame
    velocity, continued for ``frames`` frames and wrapped around the frame's edges."""
    start = motion_path(prompt, BASE_FRAMES, height, width, seed)
    step = (start[-1] - start[0]) / (BASE_FRAMES - 1)
    path = start[0] + step * torch.arange(frames, dtype=torch.float32)[:, None]
    return torch.remainder(path, torch.tensor([float(width), float(height)]))


def render_long_clip(prompt: WorldPrompt, frames: int, height: int = 32, width: int = 32, seed: int = 0):
    """The long clip of ``prompt``: float ``[T, 3, H, W]`` in [0, 1]; its first 17 frames are ``render_clip``'s."""
    path = long_path(prompt, frames, height, width, seed)
    cover = wrapped_coverage(prompt.shape, path[:, 0], path[:, 1], shape_radius(height, width), height, width)
    fg = torch.tensor(COLORS[prompt.color]).view(1, 3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[prompt.background]).view(1, 3, 1, 1)
    return bg * (1 - cover[:, None]) + fg * cover[:, None]


def torus_checks(frames: torch.Tensor, prompt: str) -> dict[str, bool]:
    """The world's defect checks (:mod:`vpotool.world.rates`) of one clip ``[T, 3, H, W]`` whose frame wraps around
    (a segment of a long clip): positions go the short way round, the direction is the sum of the frame-to-frame
    steps, and the prompted travel is ``SPEEDS[speed]`` of the frame per 16 frame steps, times the clip's steps."""
    return _clip_checks(frames, prompt, torus=True)


def segment_bounds(frames: int, segment: int = BASE_FRAMES) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges of consecutive segments of ``segment`` frames sharing their boundary frame
    (0-17, 16-33, ... for 17), the last one ending at ``frames``; a remainder under half a segment joins the
    segment before it."""
    step = segment - 1
    starts = list(range(0, max(frames - 1, 1), step))
    if len(starts) > 1 and frames - 1 - starts[-1] < step / 2:
        starts.pop()
    return [(s, starts[i + 1] + 1 if i + 1 < len(starts) else frames) for i, s in enumerate(starts)]


def segment_checks(frames: torch.Tensor, prompt: str, segment: int = BASE_FRAMES) -> list[dict[str, bool]]:
    """:func:`torus_checks` of each segment (:func:`segment_bounds`) of one long clip ``[T, 3, H, W]``: the drift
    curve of the clip, first segment first."""
    return [torus_checks(frames[a:b], prompt) for a, b in segment_bounds(frames.shape[0], segment)]
