"""Drift of the tiny autoregressive model: its own long rollouts against teacher-forced ones and the ground truth.

For prompts of a world split x seeds, three clips of FRAMES frames each:
- ``rollout``: the model's own rollout, each chunk beside the chunks it made (what ``vpotool sample`` makes);
- ``teacher``: every chunk denoised beside the ground truth's latents instead (teacher forcing, as it was trained);
- ``truth``: the rendered long clip (:mod:`vpotool.world.long`).
Prints the share of clips passing each world check per segment of 17 frames and the slope per segment, and writes
a frame strip (truth, teacher-forced, rollout for a few prompts) to --strip.

    python examples/tiny_ar/drift.py --frames 65 --split val --seeds 2 --strip docs/img/tiny-ar-drift.png
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vpotool.models import load_backend
from vpotool.rollout import initial_noise, rollout
from vpotool.stages.common import video_seed
from vpotool.stages.eval import curve_slope
from vpotool.world.grammar import world_prompts
from vpotool.world.long import render_long_clip, segment_checks
from vpotool.world.rates import CHECKS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="a tiny-ar folder (default: the shipped one)")
    ap.add_argument("--frames", type=int, default=65)
    ap.add_argument("--split", default="val")
    ap.add_argument("--prompts", type=int, default=0, help="first N prompts of the split (0: all)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--strip", default=None, help="PNG of truth / teacher-forced / rollout frames")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    backend = load_backend("tiny-ar", args.model_path)
    d, ch = backend.defaults, backend.chunking
    prompts = world_prompts(args.split)[: args.prompts or None]
    jobs = [(p, video_seed(0, p.id, k)) for p in prompts for k in range(args.seeds)]
    shape = backend.latent_shape(args.frames, d.height, d.width)
    checks = {"truth": [], "teacher": [], "rollout": []}
    shown = {}
    for i in range(0, len(jobs), args.batch):
        batch = jobs[i : i + args.batch]
        texts, seeds = [p.text for p, _ in batch], [s for _, s in batch]
        truth = torch.stack([render_long_clip(p, args.frames, d.height, d.width, s) for p, s in batch])
        with torch.no_grad():
            cond = backend.encode_prompts(texts)
            uncond = backend.encode_negative(len(texts))
            noise = initial_noise(backend, shape, seeds)
            kw = dict(chunking=ch, steps=d.steps, guidance=d.guidance, uncond=uncond)
            own = backend.decode(rollout(backend, cond, noise, **kw).latents)
            teacher = rollout(backend, cond, noise, teacher=backend.encode(truth), **kw).latents
            forced = backend.decode(teacher)
        for name, clips in (("truth", truth), ("teacher", forced), ("rollout", own)):
            checks[name] += [segment_checks(c, t) for c, t in zip(clips, texts, strict=True)]
        if i == 0:
            shown = {"truth": truth[:4], "teacher": forced[:4], "rollout": own[:4], "texts": texts[:4]}
    table = {}
    for name, per_clip in checks.items():
        n_seg = len(per_clip[0])
        curve = {k: [sum(c[j][k] for c in per_clip) / len(per_clip) for j in range(n_seg)] for k in CHECKS}
        table[name] = {k: {"per_segment": v, "slope": curve_slope(v)} for k, v in curve.items()}
    minutes = (time.perf_counter() - t0) / 60
    print(f"{len(jobs)} clips of {args.frames} frames ({args.split}), {minutes:.1f} min")
    for name, rows in table.items():
        print(f"\n{name}")
        for k, v in rows.items():
            print(f"  {k:18s} " + " ".join(f"{x:.2f}" for x in v["per_segment"]) + f"   slope {v['slope']:+.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clips": len(jobs), "frames": args.frames, "split": args.split, "minutes": minutes,
                       "table": table}, f, indent=1)  # fmt: skip
    if args.strip:
        from vpotool.report.strip import draw_strip
        from vpotool.video import to_uint8

        groups = [
            (text, [(name, to_uint8(shown[name][j])) for name in ("truth", "teacher", "rollout")])
            for j, text in enumerate(shown["texts"])
        ]
        draw_strip(groups, args.strip, frames=9, tile_height=64)


if __name__ == "__main__":
    main()
