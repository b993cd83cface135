"""Long clips of the tiny world, for autoregressive models: the motion goes on past the world's clip length.

A world clip of 17 frames crosses ``SPEEDS[speed]`` of the frame; a long clip keeps that per-frame velocity for
any number of frames, and a shape that leaves the frame on one side comes back on the other (the frame is a
torus). The first 17 frames of a long clip are the world clip of the same prompt and seed, so a model taught on
world clips has seen how every long clip starts.

:func:`segment_checks` cuts a long clip into segments of the world's clip length and runs the world's defect
checks on each, with positions measured around the torus: the drift curve of an autoregressive rollout.
"""

from __future__ import annotations

import math

import torch

from vpotool.world.grammar import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, WorldPrompt, parse_prompt
from vpotool.world.rates import CHECKS, FG_DISTANCE, background_distance
from vpotool.world.render import motion_path, shape_coverage, shape_radius

BASE_FRAMES = 17  # the world's clip length: SPEEDS are fractions of the frame crossed in its 16 frame steps


def long_path(prompt: WorldPrompt, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Centres ``[T, 2]`` (x, y pixels, within the frame) of a long clip: the world clip's start and per-frame
    velocity, continued for ``frames`` frames and wrapped around the frame's edges."""
    start = motion_path(prompt, BASE_FRAMES, height, width, seed)
    step = (start[-1] - start[0]) / (BASE_FRAMES - 1)
    path = start[0] + step * torch.arange(frames, dtype=torch.float32)[:, None]
    return torch.remainder(path, torch.tensor([float(width), float(height)]))


def wrapped_coverage(shape: str, cx, cy, radius: float, height: int, width: int) -> torch.Tensor:
    """:func:`~vpotool.world.render.shape_coverage` on the torus: the shape drawn at its centre and at the copies one
    frame width or height away, so that a shape crossing an edge shows on both sides. ``[..., H, W]``."""
    cx, cy = torch.as_tensor(cx, dtype=torch.float32), torch.as_tensor(cy, dtype=torch.float32)
    covers = [
        shape_coverage(shape, cx + dx, cy + dy, radius, height, width)
        for dx in (-width, 0, width)
        for dy in (-height, 0, height)
    ]
    return torch.stack(covers).amax(0)


def render_long_clip(prompt: WorldPrompt, frames: int, height: int = 32, width: int = 32, seed: int = 0):
    """The long clip of ``prompt``: float ``[T, 3, H, W]`` in [0, 1]; its first 17 frames are ``render_clip``'s."""
    path = long_path(prompt, frames, height, width, seed)
    cover = wrapped_coverage(prompt.shape, path[:, 0], path[:, 1], shape_radius(height, width), height, width)
    fg = torch.tensor(COLORS[prompt.color]).view(1, 3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[prompt.background]).view(1, 3, 1, 1)
    return bg * (1 - cover[:, None]) + fg * cover[:, None]


def _circular_mean(weights: torch.Tensor, coords: torch.Tensor, period: float) -> torch.Tensor:
    """Weighted mean position on a circle of ``period``: ``weights [T, H, W]``, ``coords`` broadcastable -> ``[T]``."""
    angle = coords * (2 * math.pi / period)
    s = (weights * torch.sin(angle)).sum((1, 2))
    c = (weights * torch.cos(angle)).sum((1, 2))
    return torch.remainder(torch.atan2(s, c) * (period / (2 * math.pi)), period)


def _wrap(d: torch.Tensor, period: float) -> torch.Tensor:
    """Displacements taken the short way round a circle of ``period``: into [-period / 2, period / 2)."""
    return torch.remainder(d + period / 2, period) - period / 2


def torus_checks(frames: torch.Tensor, prompt: str, velocity_frames: int = BASE_FRAMES) -> dict[str, bool]:
    """The world's defect checks (:mod:`vpotool.world.rates`) of one clip ``[T, 3, H, W]`` whose frame wraps
    around: centroids are circular means, distances and displacements go the short way round, and the direction is
    the sum of the frame-to-frame steps. The prompted travel is the long clip's: ``SPEEDS[speed]`` of the frame per
    16 frame steps, times the clip's steps."""
    spec = parse_prompt(prompt)
    x = frames.float()
    t, _, h, w = x.shape
    d_bg = background_distance(x, spec.background)
    fg = d_bg > FG_DISTANCE
    area = fg.sum((1, 2)).float()
    radius = shape_radius(h, w)
    area0 = torch.pi * radius**2
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    cx = _circular_mean(fg.float(), xs, w)
    cy = _circular_mean(fg.float(), ys, h)
    dist = (_wrap(xs - cx.view(-1, 1, 1), w).square() + _wrap(ys - cy.view(-1, 1, 1), h).square()).sqrt()
    compact = (fg & (dist <= 2 * radius)).sum((1, 2)) >= 0.8 * area
    ok = (area >= 0.4 * area0) & (area <= 2.5 * area0) & compact
    mass = d_bg.sum((1, 2))
    out = dict.fromkeys(CHECKS, False)
    wobble = (mass[2:] - 2 * mass[1:-1] + mass[:-2]).abs().mean() if t >= 3 else mass.new_zeros(())
    out["flicker"] = bool(wobble > 0.15 * mass.mean().clamp(min=1))
    if not bool(ok.float().mean() >= 0.5):
        return out
    out["shape_present"] = True
    sel = ok.nonzero().flatten()
    pixels = x.permute(0, 2, 3, 1)[fg & ok.view(-1, 1, 1)]
    palette = torch.tensor([COLORS[c] for c in COLORS])
    out["color_correct"] = list(COLORS)[(palette - pixels.mean(0)).square().sum(1).argmin().item()] == spec.color
    ious = []
    for shape in SHAPES:
        cover = wrapped_coverage(shape, cx[sel], cy[sel], radius, h, w) > 0.5
        ious.append(((cover & fg[sel]).sum() / (cover | fg[sel]).sum().clamp(min=1)).item())
    out["shape_correct"] = SHAPES[max(range(len(SHAPES)), key=ious.__getitem__)] == spec.shape
    vx, vy = DIRECTIONS[spec.direction]
    steps = int(sel[-1] - sel[0])
    travel = SPEEDS[spec.speed] * (w if vx else h) * steps / (velocity_frames - 1)
    dx = _wrap(cx[sel].diff(), w).sum().item()  # present frames are at most a few pixels apart
    dy = _wrap(cy[sel].diff(), h).sum().item()
    along, across = dx * vx + dy * vy, abs(dx * vy) + abs(dy * vx)
    out["direction_correct"] = steps > 0 and along >= 0.25 * travel and along > across
    out["static"] = steps > 0 and (dx * dx + dy * dy) ** 0.5 < 0.15 * travel
    return out


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
