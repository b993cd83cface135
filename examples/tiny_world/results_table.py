"""Write the methods comparison of ``compare.sh`` as markdown (stdout): one row per run from its eval rows,
its ``loop.yaml`` and its wall time, plus online DPO's spread over training seeds.

    python examples/tiny_world/results_table.py runs/compare [--minutes M] > docs/results.md
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from vpotool.manifest import manifest_config

COLUMNS = ["world.text_alignment", "world.motion", "world.temporal_consistency", "world.visual_quality"]
SEEDED = "online-dpo-seed"  # the default loop, repeated over training seeds: the reference of every ablation
ABLATIONS = [  # (question, [(variant, run name or SEEDED)]), in the order of OnlineVPO's ablations
    (
        "online vs offline",
        [("online: pairs from the current policy", SEEDED), ("offline: pairs from the base", "offline-dpo")],
    ),
    (
        "reference model",
        [("curriculum: updated from the policy", SEEDED), ("fixed: the base model", "online-dpo-fixed-ref")],
    ),
    ("candidates per prompt, same budget", [("K=2", "online-dpo-k2"), ("K=4", SEEDED), ("K=8", "online-dpo-k8")]),
    ("training signal", [("DPO on preference pairs", SEEDED), ("ReFL: reward gradient", "refl"), ("SCST", "scst")]),
]


ROW_ORDER = ["base", SEEDED, "online-dpo-fixed-ref", "offline-dpo", "online-dpo-k2", "online-dpo-k8", "refl", "scst"]


def row_order(checkpoint: str) -> int:
    """Rows follow the ablations: the base, online DPO's seeds, then each variant; unknown runs last."""
    run = checkpoint.split("/")[0]
    return next((i for i, name in enumerate(ROW_ORDER) if run.startswith(name)), len(ROW_ORDER))


def describe(cfg: dict) -> tuple[str, int]:
    """A run's method in words and the number of videos it sampled for training."""
    videos = cfg["iterations"] * cfg["prompts_per_iter"] * cfg["candidates"]
    if cfg["algo"] == "refl":
        return "ReFL (reward gradient through the last step)", cfg["max_steps"] * cfg["batch_size"]
    if cfg["algo"] == "scst":
        return f"SCST (group-mean baseline, K={cfg['candidates']})", videos
    mode = "offline" if cfg["iterations"] == 1 else "online"
    ref = f"curriculum every {cfg['ref_update_interval']}" if cfg["ref_update_interval"] else "fixed reference"
    return f"{mode} DPO, K={cfg['candidates']}, {ref}", videos


def ablation_lines(overall: dict[str, dict], base: float) -> list[str]:
    """OnlineVPO-style ablation table: each variant against online DPO's mean over training seeds, with the
    difference in units of the seed standard deviation (single runs within about 2 of it are within noise)."""
    seeded = [r for run, r in overall.items() if run.startswith(SEEDED)]
    if not seeded:
        return []
    ref = statistics.mean(r["mean"] for r in seeded)
    sd = statistics.stdev(r["mean"] for r in seeded) if len(seeded) > 1 else math.nan
    noise = (
        f" (seed std {sd:.3f}); a single run within about two seed stds of it is within seed noise" if sd == sd else ""
    )
    lines = [
        "",
        "## Ablations",
        "",
        "Each variant against online DPO (the default loop: K=4, curriculum reference), whose figure is the mean "
        f"over its {len(seeded)} training seeds{noise}. Base model: {base:.3f}.",
        "",
        "| ablation | variant | world overall | vs online DPO | in seed stds | win rate vs base |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for question, variants in ABLATIONS:
        for name, run in variants:
            if run == SEEDED:
                mean, win = ref, statistics.mean(r["win_rate"] for r in seeded)
                cells = [f"**{mean:.3f}** ({len(seeded)} seeds)", "-", "-"]
            elif run in overall:
                mean, win = overall[run]["mean"], overall[run]["win_rate"]
                cells = [f"{mean:.3f}", f"{mean - ref:+.3f}", fmt((mean - ref) / sd if sd else math.nan, 1)]
            else:
                continue
            lines.append(f"| {question} | {name} | " + " | ".join(cells) + f" | {fmt(win, 2)} |")
    return lines


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the compare.sh output folder")
    ap.add_argument("--minutes", type=int, default=None, help="total wall time, for the header")
    args = ap.parse_args()
    out = Path(args.out)
    table = pq.read_table(out / "eval" / "eval.parquet")
    rows = table.to_pylist()
    by = {(r["checkpoint"], r["metric"]): r for r in rows}
    checkpoints = sorted(dict.fromkeys(r["checkpoint"] for r in rows), key=row_order)
    eval_cfg = manifest_config(table)

    base = by[("base", "world.overall")]
    lines = [
        "# Methods comparison on the tiny world",
        "",
        "Produced by `bash examples/tiny_world/compare.sh` (CPU, 2 cores"
        + (f", {args.minutes} minutes in all" if args.minutes is not None else "")
        + "). Every run starts from the shipped `tiny` base model and samples the same number of videos for "
        "training (ReFL: its gradient rollouts); every checkpoint is then sampled on the 60 held-out prompts "
        f"with the same {base['n'] // 60 if base['n'] else '?'} seeds per prompt and scored with the world reward. "
        "Win rate: the share of (prompt, seed) videos on which the run beats the base model on world overall "
        "(ties count half). Fréchet: distance of clip features to rendered ground truth (lower is better).",
        "",
        "| run | method | videos | train min | world overall | vs base | win rate | text | motion | temporal "
        "| quality | Fréchet |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seeds = []
    runs = {}  # run name -> its world overall row
    for ckpt in checkpoints:
        overall = by[(ckpt, "world.overall")]
        run = ckpt.split("/")[0]
        if ckpt == "base":
            method, videos, minutes = "the shipped base model", 0, None
        else:
            cfg = yaml.safe_load((out / run / "loop.yaml").read_text())
            method, videos = describe(cfg)
            seconds = out / run / "seconds"
            minutes = int(seconds.read_text()) / 60 if seconds.exists() else None
            runs[run] = overall
            if run.startswith(SEEDED):
                seeds.append(overall["mean"])
        delta = overall["mean"] - base["mean"]
        cells = [fmt(by.get((ckpt, m), {}).get("mean", math.nan)) for m in COLUMNS]
        frechet = by.get((ckpt, "world.frechet"), {}).get("mean", math.nan)
        lines.append(
            f"| {ckpt} | {method} | {videos} | {fmt(minutes, 1)} | {overall['mean']:.3f} ± {overall['std']:.3f} "
            f"| {delta:+.3f} | {fmt(overall['win_rate'], 2)} | " + " | ".join(cells) + f" | {fmt(frechet, 1)} |"
        )
    if len(seeds) > 1:
        mean, sd = statistics.mean(seeds), statistics.stdev(seeds)
        lines += [
            "",
            f"**Online DPO over {len(seeds)} training seeds:** held-out world overall {mean:.3f} ± {sd:.3f} "
            f"(mean ± std of the seeds' means) against {base['mean']:.3f} for the base model: "
            f"{(mean - base['mean']) / sd if sd else float('inf'):.1f} seed standard deviations above it.",
        ]
    lines += ablation_lines(runs, base["mean"])
    if eval_cfg:
        lines += ["", f"Eval settings: `{ {k: eval_cfg[k] for k in ('prompts', 'seeds', 'seed') if k in eval_cfg} }`."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
