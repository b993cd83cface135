"""Clip features and the Frechet distance for the tiny world: a weight-free stand-in for FVD.

FVD embeds clips with a pretrained video network and compares Gaussian fits of the two embedding sets. A tiny
world clip is one shape moving on a plain background, so a few hand-made statistics describe it well enough;
:func:`clip_features` computes them from the pixels alone (it never reads the prompt), so generated and
ground-truth clips go through exactly the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRID = 4  # the coarse layout is GRID x GRID cells
MASK_THRESHOLD, MASK_SOFTNESS = 0.25, 0.05  # colour distance from the background where the foreground starts
LUMA = (0.299, 0.587, 0.114)

# What each column of clip_features means (units: colours in [0, 1], positions in frame widths / heights).
FEATURE_NAMES: tuple[str, ...] = (
    "fg_red",  # foreground colour, mask-weighted mean over every frame
    "fg_green",
    "fg_blue",
    "fg_spread",  # RMS colour distance of foreground pixels from that mean (0 for a flat-coloured shape)
    "area_mean",  # foreground area as a fraction of the frame, mean over frames
    "area_spread",  # its standard deviation over frames (0 for a shape that keeps its size)
    "velocity_x",  # mean centroid step times (T - 1): the horizontal distance travelled over the clip
    "velocity_y",  # the same vertically (positive is down)
    "velocity_spread",  # RMS deviation of the per-step velocity from its mean, same units (0: constant speed)
    "crispness",  # mean distance of each pixel to the nearer of background and shape colour (0: two clean colours)
    *(f"layout_{i}{j}" for i in range(GRID) for j in range(GRID)),  # cell luminance, mean over frames
    *(f"change_{i}{j}" for i in range(GRID) for j in range(GRID)),  # cell mean |luminance change| between frames
)


def clip_features(frames: torch.Tensor) -> torch.Tensor:
    """Per-clip feature vectors (see ``FEATURE_NAMES``) of float frames ``[B, T, 3, H, W]`` in [0, 1].

    The background is the clip's median colour (the shape covers under a tenth of the frame); the foreground is a
    soft mask of pixels far from it, as in the world reward. Returns float32 ``[B, len(FEATURE_NAMES)]``.
    """
    x = frames.detach().float()
    b, t, _, h, w = x.shape
    bg = x.permute(0, 2, 1, 3, 4).flatten(2).median(-1).values.view(b, 1, 3, 1, 1)
    d_bg = ((x - bg) ** 2).sum(2).add(1e-12).sqrt()  # [B, T, H, W]
    mask = torch.sigmoid((d_bg - MASK_THRESHOLD) / MASK_SOFTNESS)
    eps = 1e-6

    # colour of the shape and how uniform it is
    weight = mask[:, :, None]
    color = (weight * x).sum((1, 3, 4)) / (weight.sum((1, 3, 4)) + eps)  # [B, 3]
    d_fg = ((x - color.view(b, 1, 3, 1, 1)) ** 2).sum(2)  # squared, [B, T, H, W]
    spread = ((mask * d_fg).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) + eps)).sqrt()

    # size, and the centroid's path
    area = mask.mean((2, 3))  # [B, T], fraction of the frame
    mass = mask.sum((2, 3)) + eps
    xs = (torch.arange(w, dtype=torch.float32, device=x.device) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32, device=x.device) + 0.5) / h
    centre = torch.stack([(mask * xs).sum((2, 3)) / mass, (mask * ys[:, None]).sum((2, 3)) / mass], -1)  # [B, T, 2]
    if t > 1:
        steps = centre.diff(dim=1) * (t - 1)  # per-step velocity, in frame sizes per clip
        velocity = steps.mean(1)
        velocity_spread = ((steps - velocity[:, None]) ** 2).sum(-1).mean(1).sqrt()
    else:
        velocity = torch.zeros(b, 2, device=x.device)
        velocity_spread = torch.zeros(b, device=x.device)

    crisp = torch.minimum(d_bg, d_fg.add(1e-12).sqrt()).mean((1, 2, 3))

    # coarse layout of brightness and where it changes
    luma = (x * torch.tensor(LUMA, device=x.device).view(1, 1, 3, 1, 1)).sum(2)  # [B, T, H, W]
    cells = F.adaptive_avg_pool2d(luma, GRID)  # [B, T, GRID, GRID]
    layout = cells.mean(1).flatten(1)
    if t > 1:
        change = F.adaptive_avg_pool2d(luma.diff(dim=1).abs(), GRID).mean(1).flatten(1)
    else:
        change = torch.zeros_like(layout)

    scalars = [spread, area.mean(1), area.std(1, correction=0), velocity[:, 0], velocity[:, 1], velocity_spread, crisp]
    return torch.cat([color, torch.stack(scalars, 1), layout, change], 1)


def gaussian_fit(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, divisor n - 1; zeros for a single row) of ``feats [N, D]``."""
    x = torch.as_tensor(feats).double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / max(x.shape[0] - 1, 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets ``[N, D]`` and ``[M, D]`` (as FID and FVD):

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2))``. The trace of the matrix square root is the
    sum of square roots of the eigenvalues of the symmetric ``C_a^(1/2) C_b C_a^(1/2)``, which has the same
    eigenvalues as ``C_a C_b``; tiny negative eigenvalues from rounding count as 0. Lower is closer; 0 for a set
    against itself. Returns a float >= 0.
    """
    mu_a, cov_a = gaussian_fit(feats_a)
    mu_b, cov_b = gaussian_fit(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sets differ in width: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d = ((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(d), 0.0)


def _sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix, by eigen-decomposition."""
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
