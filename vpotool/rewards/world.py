"""``world``: a prompt-aware, weight-free, differentiable reward for the tiny world, in the spirit of VideoScore.

It reads the prompt (colour, shape, direction, speed, background), finds the foreground with a soft mask (pixels
far from the prompted background), and scores four dimensions in [0, 1]:

- ``visual_quality``: one crisp, compact shape of the expected size (pixels are background or shape colour);
- ``temporal_consistency``: a shape is there, keeps its colour and size, and the background does not flicker;
- ``motion``: the centroid moves in the prompted direction at the prompted speed;
- ``text_alignment``: the shape's colour and outline match the prompt's rather than the other words';

``overall`` is their mean. Every step is smooth in the pixels, so ReFL can backpropagate through it.
"""

from __future__ import annotations

import torch

from vpotool.rewards.base import check_frames
from vpotool.world.grammar import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, parse_prompt
from vpotool.world.long import segment_bounds
from vpotool.world.rates import BASE_FRAMES as SEGMENT
from vpotool.world.render import shape_coverage, shape_radius

MASK_THRESHOLD, MASK_SOFTNESS = 0.25, 0.05  # colour distance from the background where the foreground starts


def _soft_pick(similarity: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax probability of choice ``index [B]`` among ``similarity [B, ..., K]`` (higher is closer)."""
    p = (similarity / temperature).softmax(-1)
    index = index.view(-1, *([1] * (p.ndim - 1))).expand(*p.shape[:-1], 1)
    return p.gather(-1, index).squeeze(-1)


def world_scores(frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The world reward's dimensions for ``frames`` float ``[B, T, 3, H, W]`` in [0, 1] -> dict of float32 ``[B]``."""
    specs = [parse_prompt(p) for p in prompts]
    x = frames.float()
    b, t, _, h, w = x.shape
    dev = x.device
    bg = torch.tensor([BACKGROUNDS[s.background] for s in specs], device=dev).view(b, 1, 3, 1, 1)
    palette = torch.tensor(list(COLORS.values()), device=dev)  # [K, 3]
    color_idx = torch.tensor([list(COLORS).index(s.color) for s in specs], device=dev)
    shape_idx = torch.tensor([SHAPES.index(s.shape) for s in specs], device=dev)
    radius = shape_radius(h, w)
    area0 = torch.pi * radius**2

    # soft foreground mask, its area, centroid and (core-weighted) colour per frame
    d_bg = ((x - bg) ** 2).sum(2).add(1e-6).sqrt()  # [B, T, H, W]
    mask = torch.sigmoid((d_bg - MASK_THRESHOLD) / MASK_SOFTNESS)
    area = mask.sum((2, 3))  # [B, T]
    xs = torch.arange(w, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=dev, dtype=torch.float32) + 0.5
    cx = (mask * xs).sum((2, 3)) / (area + 1)
    cy = (mask * ys[:, None]).sum((2, 3)) / (area + 1)
    core = mask**4
    color = (core[:, :, None] * x).sum((3, 4)) / (core.sum((2, 3))[..., None] + 1)  # [B, T, 3]

    # visual quality: crisp pixels, a shape of the expected size, mass gathered around one centre
    d_own = ((x - color[..., None, None]) ** 2).sum(2).add(1e-6).sqrt()
    crisp = torch.exp(-torch.minimum(d_bg, d_own).mean((1, 2, 3)) / 0.05)
    presence = torch.exp(-((area + 1) / (area0 + 1)).log().abs()).mean(1)
    dist = ((xs - cx[..., None, None]) ** 2 + (ys[:, None] - cy[..., None, None]) ** 2 + 1e-6).sqrt()
    compact = ((mask * torch.sigmoid(2 * radius - dist)).sum((2, 3)) / (area + 1)).mean(1)
    quality = (crisp + presence + compact) / 3

    # temporal consistency: steady colour and size, a background that does not flicker
    if t > 1:
        steady_color = torch.exp(-color.std(1).mean(1) / 0.05)
        steady_size = torch.exp(-(area.std(1) / (area.mean(1) + 1)) / 0.1)
        still_bg = (1 - mask[:, 1:]) * (1 - mask[:, :-1])
        bg_change = (still_bg[:, :, None] * (x[:, 1:] - x[:, :-1]).abs()).sum((2, 3, 4))
        calm = torch.exp(-(bg_change / (3 * still_bg.sum((2, 3)) + 1)).mean(1) / 0.02)
        consistency = presence * (steady_color + steady_size + calm) / 3  # nothing on screen is not consistency
    else:
        consistency = torch.ones(b, device=dev)

    # motion: centroid steps against the prompted velocity (pixels per frame)
    if t > 1:
        v = torch.tensor(
            [
                [
                    d * SPEEDS[s.speed] * (w if DIRECTIONS[s.direction][0] else h) / (t - 1)
                    for d in DIRECTIONS[s.direction]
                ]
                for s in specs
            ],
            device=dev,
        )  # [B, 2]
        steps = torch.stack([cx.diff(dim=1), cy.diff(dim=1)], -1)  # [B, T-1, 2]
        err = ((steps - v[:, None]) ** 2).sum(-1).add(1e-6).sqrt().mean(1)
        motion = torch.exp(-err / v.norm(dim=-1))
    else:
        motion = torch.ones(b, device=dev)

    # text alignment: colour and outline, each as the probability of the prompted word among the vocabulary's
    color_sim = -((color.mean(1)[:, None] - palette) ** 2).sum(-1).add(1e-6).sqrt()  # [B, K]
    color_match = _soft_pick(color_sim, color_idx, 0.1)
    templates = torch.stack([shape_coverage(s, cx, cy, radius, h, w) for s in SHAPES], -1)  # [B, T, H, W, 3]
    m = mask[..., None]
    iou = torch.minimum(m, templates).sum((2, 3)) / (torch.maximum(m, templates).sum((2, 3)) + 1)  # [B, T, 3]
    shape_match = _soft_pick(iou, shape_idx, 0.05).mean(1)
    alignment = (color_match + shape_match) / 2

    dims = {
        "visual_quality": quality,
        "temporal_consistency": consistency,
        "motion": motion,
        "text_alignment": alignment,
    }
    dims["overall"] = torch.stack(list(dims.values())).mean(0)
    return dims


class WorldReward:
    """The tiny world's reward (see the module docstring); prompts must come from the world grammar."""

    name = "world"
    differentiable = True
    score_range = (0.0, 1.0)
    dimensions = ("visual_quality", "temporal_consistency", "motion", "text_alignment", "overall")
    # Scores closer than this are not paired by default: half the spread among a tiny-model prompt's candidates.
    pair_margin = 0.02

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_frames(frames, prompts)
        t = frames.shape[1]
        if t <= SEGMENT or (t - 1) % (SEGMENT - 1):
            return world_scores(frames, prompts)
        # A long video (an autoregressive rollout): the prompted speed holds per 17-frame segment
        # (vpotool.world.long), so each segment is scored as a world clip and the scores averaged.
        parts = [world_scores(frames[:, a:b], prompts) for a, b in segment_bounds(t, SEGMENT)]
        return {k: torch.stack([p[k] for p in parts]).mean(0) for k in parts[0]}
