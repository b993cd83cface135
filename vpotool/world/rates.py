"""Defect rates a reader understands, for tiny-world clips: is the shape there, of the right colour and outline,
moving the right way; does the clip flicker or stand still.

Each check is a yes/no per clip from hard thresholds on the pixels (not differentiable; the ``world`` reward is
the smooth training signal). :func:`clip_checks` gives them per clip, :func:`rates` their shares over a set.
Definitions, for a clip of ``T`` frames and its prompt (docs/world.md has them too):

- foreground: pixels whose colour is more than ``FG_DISTANCE`` from the prompted background;
- ``shape_present``: in at least half of the frames the foreground has 0.4-2.5x a world shape's area and at least
  80% of it lies within two radii of its centroid (one compact blob);
- ``color_correct``: present, and the mean colour of the foreground is nearest the prompted colour among the
  grammar's colours;
- ``shape_correct``: present, and of the grammar's shapes centred on each frame's centroid, the prompted one
  overlaps the foreground best (intersection over union summed over frames);
- ``direction_correct``: present, and the centroid's displacement from the first to the last present frame goes
  the prompted way by at least a quarter of the prompted travel, more along the motion than across it;
- ``static``: present, and the centroid's displacement is under 0.15 of the prompted travel;
- ``flicker``: the foreground's contrast mass changes sign of trend from frame to frame: the mean absolute second
  difference of the per-frame mass is over 0.15 of its mean.
"""

from __future__ import annotations

import math

import torch

from vpotool.world.grammar import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, parse_prompt
from vpotool.world.render import shape_coverage, shape_radius, wrapped_coverage

FG_DISTANCE = 0.3
BASE_FRAMES = 17  # the world clip's length: SPEEDS are shares of the frame crossed in its 16 frame steps
# Each check and which way its rate (the share of clips it flags) is better: static and flicker are defects.
CHECK_DIRECTIONS = {
    "shape_present": "higher",
    "color_correct": "higher",
    "shape_correct": "higher",
    "direction_correct": "higher",
    "static": "lower",
    "flicker": "lower",
}
CHECKS = tuple(CHECK_DIRECTIONS)


def background_distance(frames: torch.Tensor, background: str) -> torch.Tensor:
    """Each pixel's colour distance from the ``background``'s colour: ``[T, H, W]`` for float ``frames
    [T, 3, H, W]``; summed over a frame it is the frame's contrast mass (the flicker check's signal)."""
    bg = torch.tensor(BACKGROUNDS[background]).view(1, 3, 1, 1)
    return (frames.float() - bg).square().sum(1).sqrt()


def _circular_mean(weights: torch.Tensor, coords: torch.Tensor, period: float) -> torch.Tensor:
    """Weighted mean position on a circle of ``period``: ``weights [T, H, W]``, ``coords`` broadcastable -> ``[T]``."""
    angle = coords * (2 * math.pi / period)
    s = (weights * torch.sin(angle)).sum((1, 2))
    c = (weights * torch.cos(angle)).sum((1, 2))
    return torch.remainder(torch.atan2(s, c) * (period / (2 * math.pi)), period)


def _wrap(d: torch.Tensor, period: float) -> torch.Tensor:
    """Displacements taken the short way round a circle of ``period``: into [-period / 2, period / 2)."""
    return torch.remainder(d + period / 2, period) - period / 2


def _clip_checks(frames: torch.Tensor, prompt: str, torus: bool = False) -> dict[str, bool]:
    """The checks of one clip ``[T, 3, H, W]``. ``torus``: the frame wraps around (a long clip's segment): centroids
    are circular means, distances go the short way round, the displacement is the sum of the frame-to-frame steps,
    and the prompted travel is per 16 frame steps (the world clip's), times the segment's steps."""
    spec = parse_prompt(prompt)
    x = frames.float()
    t, _, h, w = x.shape
    d_bg = background_distance(x, spec.background)
    fg = d_bg > FG_DISTANCE
    area = fg.sum((1, 2)).float()
    radius = shape_radius(h, w)
    area0 = torch.pi * radius**2
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    if torus:
        cx, cy = _circular_mean(fg.float(), xs, w), _circular_mean(fg.float(), ys, h)
        ddx, ddy = _wrap(xs - cx.view(-1, 1, 1), w), _wrap(ys - cy.view(-1, 1, 1), h)
    else:
        cx = (fg * xs).sum((1, 2)) / area.clamp(min=1)
        cy = (fg * ys).sum((1, 2)) / area.clamp(min=1)
        ddx, ddy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    near = (ddx.square() + ddy.square()).sqrt() <= 2 * radius
    compact = (fg & near).sum((1, 2)) >= 0.8 * area
    ok = (area >= 0.4 * area0) & (area <= 2.5 * area0) & compact
    present = bool(ok.float().mean() >= 0.5)

    mass = d_bg.sum((1, 2))
    flicker = bool(t >= 3 and (mass[2:] - 2 * mass[1:-1] + mass[:-2]).abs().mean() > 0.15 * mass.mean().clamp(min=1))
    out = dict.fromkeys(CHECKS, False)
    out["flicker"] = flicker
    if not present:
        return out
    out["shape_present"] = True

    sel = ok.nonzero().flatten()
    pixels = x.permute(0, 2, 3, 1)[fg & ok.view(-1, 1, 1)]  # [N, 3] foreground pixels of the good frames
    palette = torch.tensor([COLORS[c] for c in COLORS])
    nearest = (palette - pixels.mean(0)).square().sum(1).argmin().item()
    out["color_correct"] = list(COLORS)[nearest] == spec.color

    coverage = wrapped_coverage if torus else shape_coverage
    ious = []
    for shape in SHAPES:
        cover = coverage(shape, cx[sel], cy[sel], radius, h, w) > 0.5
        inter, union = (cover & fg[sel]).sum(), (cover | fg[sel]).sum()
        ious.append((inter / union.clamp(min=1)).item())
    out["shape_correct"] = SHAPES[max(range(len(SHAPES)), key=ious.__getitem__)] == spec.shape

    vx, vy = DIRECTIONS[spec.direction]
    travel = SPEEDS[spec.speed] * (w if vx else h)
    first, last = sel[0], sel[-1]
    if torus:
        travel *= int(last - first) / (BASE_FRAMES - 1)
        dx, dy = _wrap(cx[sel].diff(), w).sum().item(), _wrap(cy[sel].diff(), h).sum().item()
    else:
        dx, dy = (cx[last] - cx[first]).item(), (cy[last] - cy[first]).item()
    along, across = dx * vx + dy * vy, abs(dx * vy) + abs(dy * vx)
    moved = not torus or last > first  # a torus segment with one present frame has no direction
    out["direction_correct"] = moved and along >= 0.25 * travel and along > across
    out["static"] = moved and (dx * dx + dy * dy) ** 0.5 < 0.15 * travel
    return out


def clip_checks(frames: torch.Tensor, prompts: list[str]) -> list[dict[str, bool]]:
    """The checks (see the module docstring) of each clip of ``frames`` float ``[B, T, 3, H, W]`` in [0, 1]."""
    return [_clip_checks(f, p) for f, p in zip(frames, prompts, strict=True)]


def rates(checks: list[dict[str, bool]]) -> dict[str, float]:
    """The share of clips passing each check (NaN for no clips)."""
    n = len(checks)
    return {k: (sum(c[k] for c in checks) / n if n else float("nan")) for k in CHECKS}
