"""Frames of the tiny model against rendered ground truth on held-out prompts, as one PNG, with the world rates.

    python examples/tiny_world/base_strip.py --out docs/img/tiny-base-heldout.png [--model-path FOLDER]

Each prompt gets two rows: the rendered clip (its path placed by the same seed) and the model's video, five
frames each from first to last. The held-out prompts are spread over the split; the model samples with its
default settings and eval's per-video seeds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vpotool.models import load_backend
from vpotool.stages.common import video_seed
from vpotool.stages.sample import generate
from vpotool.world import render_clip, world_prompts
from vpotool.world.rates import clip_checks, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--model-path", default=None, help="a tiny model folder (default: the shipped weights)")
    ap.add_argument("--prompts", type=int, default=10, help="held-out prompts to show")
    args = ap.parse_args()
    from PIL import Image

    backend = load_backend("tiny", args.model_path)
    d = backend.defaults
    settings = dict(frames=d.frames, height=d.height, width=d.width, steps=d.steps, guidance=d.guidance,
                    noise_level=0.0, sampler="pipeline")  # fmt: skip
    held = world_prompts("heldout")
    chosen = [held[(i * 7) % len(held)] for i in range(args.prompts)]  # every colour, shape and background
    seeds = [video_seed(0, p.id, 0) for p in chosen]
    with torch.no_grad():
        _, frames = generate(backend, [p.text for p in chosen], seeds, settings)
    checks = clip_checks(frames, [p.text for p in chosen])
    picks = np.linspace(0, d.frames - 1, 5).round().astype(int)
    rows = []
    for p, seed, clip in zip(chosen, seeds, frames, strict=True):
        truth = render_clip(p, frames=d.frames, height=d.height, width=d.width, seed=seed)
        for src in (truth, clip):
            tiles = [np.pad((src[i].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy(), ((0, 2), (0, 2), (0, 0)),
                            constant_values=255) for i in picks]  # fmt: skip
            rows.append(np.concatenate(tiles, 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    image = np.concatenate(rows, 0)
    Image.fromarray(image).resize((image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST).save(args.out)
    for p, c in zip(chosen, checks, strict=True):
        print(f"{p.text:62s} " + " ".join(k for k, v in c.items() if v))
    print({k: round(v, 2) for k, v in rates(checks).items()})


if __name__ == "__main__":
    main()
