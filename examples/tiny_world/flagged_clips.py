"""Which clips did alignment change on one world check? For an eval folder (``vpotool eval --out`` or a loop's
``RUN/eval``), the videos whose check (``vpotool.world.rates``) differs between the base model and a checkpoint
on the same prompt and seed, counted and drawn: every frame of each, the base model's row above the
checkpoint's, clips the checkpoint newly flags (or newly passes) first.

    python examples/tiny_world/flagged_clips.py runs/loop/eval --check flicker --out flicker.png

For ``flicker`` it also counts the flagged clips that alternate frame to frame, as the pretraining mix's
flickering clips do (every other frame at half contrast), apart from those whose contrast dips and recovers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vpotool.manifest import read_manifest
from vpotool.report.strip import draw_strip
from vpotool.stages.score import load_frames
from vpotool.video import to_uint8
from vpotool.world.grammar import parse_prompt
from vpotool.world.rates import CHECKS, background_distance, clip_checks

ALTERNATING = 6  # sign changes of the contrast mass's frame-to-frame change that make a clip "alternating"
SIGNIFICANT = 0.05  # a frame-to-frame change counts when over this share of the clip's mean contrast mass


def alternations(mass: torch.Tensor) -> int:
    """How often two successive significant frame-to-frame changes of ``mass`` have opposite signs."""
    step = mass.diff()
    big = step.abs() > SIGNIFICANT * mass.mean()
    flips = (torch.sign(step[1:]) != torch.sign(step[:-1])) & big[1:] & big[:-1]
    return int(flips.sum())


def clip_stats(samples: Path, batch: int = 32) -> dict[tuple[str, int], dict]:
    """Per (prompt id, candidate) of a samples manifest: its row, frames, checks and alternation count."""
    rows = read_manifest(samples, "samples").to_pylist()
    out = {}
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        frames = load_frames(samples, part)
        for r, f, c in zip(part, frames, clip_checks(frames, [r["prompt"] for r in part]), strict=True):
            mass = background_distance(f, parse_prompt(r["prompt"]).background).sum((1, 2))
            alt = alternations(mass)
            out[r["prompt_id"], r["candidate"]] = dict(row=r, frames=f, checks=c, alternations=alt)
    return out


def changed(base: dict, other: dict, check: str) -> list[tuple[str, int]]:
    """Keys whose ``check`` differs between two :func:`clip_stats`, those ``other`` newly passes/flags first."""
    keys = sorted(k for k in base.keys() & other.keys() if base[k]["checks"][check] != other[k]["checks"][check])
    return sorted(keys, key=lambda k: not other[k]["checks"][check])


def strip(base: dict, other: dict, name: str, keys: list, out: Path) -> None:
    """Every frame of each clip of ``keys``, the base model's row above ``other``'s (named ``name``), as a PNG."""
    groups = [(base[k]["row"]["prompt"], [("base", to_uint8(base[k]["frames"])), (name, to_uint8(other[k]["frames"]))])
              for k in keys]  # fmt: skip
    draw_strip(groups, out, frames=None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path, help="an eval folder: base/ and one folder per checkpoint")
    ap.add_argument("--checkpoint", help="the checkpoint's folder in it (default: the only one but base)")
    ap.add_argument("--check", default="flicker", choices=CHECKS)
    ap.add_argument("--rows", type=int, default=6, help="clips drawn at most")
    ap.add_argument("--out", type=Path, help="PNG to write (default: print only)")
    args = ap.parse_args(argv)
    folders = sorted(p.name for p in args.eval_dir.iterdir() if (p / "samples.parquet").is_file() and p.name != "base")
    name = args.checkpoint or (folders[0] if len(folders) == 1 else None)
    if name not in folders:
        raise SystemExit(f"pass --checkpoint, one of: {', '.join(folders)}")
    base, other = (clip_stats(args.eval_dir / n / "samples.parquet") for n in ("base", name))
    for label, stats in (("base", base), (name, other)):
        flagged = [s for s in stats.values() if s["checks"][args.check]]
        line = f"{label}: {args.check} {len(flagged)} of {len(stats)}"
        if args.check == "flicker":
            line += f", {sum(s['alternations'] >= ALTERNATING for s in flagged)} of them alternating"
        print(line)
    keys = changed(base, other, args.check)
    gained = sum(other[k]["checks"][args.check] for k in keys)
    print(f"{name} newly {args.check}: {gained}; no longer: {len(keys) - gained}")
    for k in keys[: args.rows]:
        print(f"  {other[k]['row']['sample_id']}: {other[k]['row']['prompt']}")
    if args.out and keys:
        strip(base, other, name, keys[: args.rows], args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
