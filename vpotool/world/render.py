"""Ground-truth clips of the tiny world: anti-aliased shapes drawn from signed distances, in torch.

The same ``shape_coverage`` draws the clips and the templates the world reward compares against, and it is
differentiable in the shape's centre, so both stay consistent.
"""

from __future__ import annotations

import math

import torch

from vpotool.world.grammar import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, WorldPrompt

RADIUS_FRACTION = 0.16  # shape size: radius of the circle of the same area, as a fraction of the shorter side
PLACEMENT_SPREAD = 0.5  # paths are placed in the middle half of the room they have (across and along the motion)


def shape_radius(height: int, width: int) -> float:
    """Radius (pixels) of the circle with the area every world shape has at this frame size."""
    return RADIUS_FRACTION * min(height, width)


def shape_coverage(shape: str, cx: torch.Tensor, cy: torch.Tensor, radius: float, height: int, width: int):
    """Fraction of each pixel covered by ``shape`` centred at ``(cx, cy)`` (pixels; any shape ``[...]``).

    All shapes have the area of a circle of ``radius``; the triangle points up and is centred on its centroid.
    Returns float ``[..., H, W]`` in [0, 1], with a one-pixel anti-aliased edge (differentiable in the centre).
    """
    cx, cy = torch.as_tensor(cx, dtype=torch.float32), torch.as_tensor(cy, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32, device=cx.device) + 0.5
    ys = torch.arange(height, dtype=torch.float32, device=cx.device) + 0.5
    dx = xs - cx[..., None, None]
    dy = ys[:, None] - cy[..., None, None]
    if shape == "circle":
        dist = (dx * dx + dy * dy + 1e-6).sqrt() - radius
    elif shape == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - radius * math.sqrt(math.pi) / 2
    elif shape == "triangle":
        side = radius * math.sqrt(4 * math.pi / math.sqrt(3))
        angles = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)  # outward edge normals, y pointing down
        edges = torch.stack([math.cos(a) * dx + math.sin(a) * dy for a in angles])
        dist = edges.amax(0) - side / (2 * math.sqrt(3))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return (0.5 - dist).clamp(0, 1)


def wrapped_coverage(shape: str, cx, cy, radius: float, height: int, width: int) -> torch.Tensor:
    """:func:`shape_coverage` on a torus (long clips, :mod:`vpotool.world.long`): the shape drawn at its centre and
    at the copies one frame width or height away, so that a shape crossing an edge shows on both sides."""
    cx, cy = torch.as_tensor(cx, dtype=torch.float32), torch.as_tensor(cy, dtype=torch.float32)
    covers = [
        shape_coverage(shape, cx + dx, cy + dy, radius, height, width)
        for dx in (-width, 0, width)
        for dy in (-height, 0, height)
    ]
    return torch.stack(covers).amax(0)


def motion_path(prompt: WorldPrompt, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The shape's centre in each frame, ``[T, 2]`` as (x, y) pixels: a straight path at the prompted speed that
    stays inside the frame; ``seed`` places it (the across-motion position and where along its room it runs),
    within the middle ``PLACEMENT_SPREAD`` of the room, so that a prompt's clips overlap and a small model learns
    them quickly."""
    gen = torch.Generator().manual_seed(seed)
    r = shape_radius(height, width) + 1.0
    vx, vy = DIRECTIONS[prompt.direction]
    along, across = (width, height) if vx else (height, width)
    travel = SPEEDS[prompt.speed] * along
    room = max(along - 2 * r - travel, 0.0)
    u, w = (0.5 + PLACEMENT_SPREAD * (torch.rand(2, generator=gen) - 0.5)).tolist()
    start = r + room * u
    side = r + (across - 2 * r) * w
    pos = start + travel * torch.linspace(0, 1, frames)
    if (vx or vy) < 0:
        pos = along - pos
    side = torch.full_like(pos, side)
    return torch.stack([pos, side] if vx else [side, pos], dim=1)


def paint_clip(prompt: WorldPrompt, path: torch.Tensor, height: int, width: int, opacity=None) -> torch.Tensor:
    """``prompt``'s shape and colours along ``path [T, 2]`` (centres in pixels), each frame's shape at
    ``opacity [T]`` (default 1): float ``[T, 3, H, W]`` in [0, 1]."""
    cover = shape_coverage(prompt.shape, path[:, 0], path[:, 1], shape_radius(height, width), height, width)
    if opacity is not None:
        cover = cover * torch.as_tensor(opacity, dtype=cover.dtype).view(-1, 1, 1)
    fg = torch.tensor(COLORS[prompt.color]).view(1, 3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[prompt.background]).view(1, 3, 1, 1)
    cover = cover[:, None]
    return bg * (1 - cover) + fg * cover


def render_clip(prompt: WorldPrompt, frames: int = 17, height: int = 32, width: int = 32, seed: int = 0):
    """The ground-truth clip of ``prompt``: float ``[T, 3, H, W]`` in [0, 1]."""
    return paint_clip(prompt, motion_path(prompt, frames, height, width, seed), height, width)


def render_batch(prompts: list[WorldPrompt], seeds: list[int], frames: int = 17, height: int = 32, width: int = 32):
    """Ground-truth clips for several prompts: float ``[B, T, 3, H, W]``."""
    return torch.stack([render_clip(p, frames, height, width, s) for p, s in zip(prompts, seeds, strict=True)])
