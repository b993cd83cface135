"""Write the autoregressive comparison of ``compare.sh`` as markdown (stdout): per variant, the mean and seed
standard deviation over its training seeds (runs ``VARIANT-seedS``) of the long-video metrics, the defect rate per
17-frame segment, the bidirectional contrast, and the two expectations of the comparison tested on the numbers.

    python examples/tiny_ar/results_table.py runs/compare-ar > docs/results-ar.md
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq

from vpotool.stages.eval import curve_slope
from vpotool.world.rates import CHECKS

GOOD = ("shape_present", "color_correct", "shape_correct", "direction_correct")  # the rest (static, flicker) are bad
ORDER = ["scst", "self-forcing-scst", "teacher-scst", "online-dpo", "scst-then-dpo"]
WHAT = {
    "base": "the shipped tiny-ar, teacher-forced (no alignment)",
    "scst": "SCST, per-video advantage, on its own rollouts",
    "self-forcing-scst": "Self-Forcing + SCST: own rollouts, per-chunk advantage to go",
    "teacher-scst": "SCST on teacher-forced rollouts (each chunk beside the rendered clip)",
    "online-dpo": "online DPO (vpotool loop) on its own rollouts",
    "scst-then-dpo": "the scst adapter, then online DPO (twice the compute)",
}
SEEDED = re.compile(r"(?P<method>[^/]+)-seed(?P<seed>\d+)/")


def load(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{checkpoint: {metric: {mean, win_rate, n}}}`` of one eval.parquet."""
    out: dict = {}
    for r in pq.read_table(path).to_pylist():
        out.setdefault(r["checkpoint"], {})[r["metric"]] = r
    return out


def defects(m: dict, suffix: str = "") -> float:
    """Share of (clip, check) failures: a good check not passed, or a bad one (static, flicker) seen."""
    vals = [1 - m[f"world.rate.{c}{suffix}"]["mean"] if c in GOOD else m[f"world.rate.{c}{suffix}"]["mean"]
            for c in CHECKS]  # fmt: skip
    return sum(vals) / len(vals)


def segments(m: dict) -> int:
    return sum(1 for k in m if k.startswith(f"world.rate.{CHECKS[0]}.seg"))


def row(m: dict) -> dict[str, float]:
    """The table's columns for one checkpoint's metrics."""
    n = segments(m)
    curve = [defects(m, f".seg{k}") for k in range(1, n + 1)] if n else [defects(m)]
    return {
        "frechet": m["world.frechet"]["mean"],
        "text": m["world.text_alignment"]["mean"],
        "coherence": m["world.temporal_consistency"]["mean"],
        "overall": m["world.overall"]["mean"],
        "late": 100 * curve[-1],
        "slope": 100 * curve_slope(curve) if n > 1 else math.nan,
        "win": 100 * m["world.overall"]["win_rate"],
        "curve": curve,
    }


def by_method(evals: dict) -> dict[str, list[tuple[int, dict]]]:
    out: dict = {}
    for ckpt, m in evals.items():
        hit = SEEDED.search(ckpt)
        if hit:
            out.setdefault(hit["method"], []).append((int(hit["seed"]), row(m)))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def minutes(out: Path, method: str, seed: int) -> float:
    f = out / f"{method}-seed{seed}" / "seconds"
    return int(f.read_text()) / 60 if f.is_file() else math.nan


def stat(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def cell(values: list[float], digits: int) -> str:
    mean, std = stat(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


COLUMNS = [  # (key, header, digits)
    ("frechet", "Fréchet to rendered clips ↓", 2),
    ("text", "text alignment", 3),
    ("coherence", "temporal coherence", 3),
    ("late", "last-segment defects ↓ %", 1),
    ("slope", "defect slope ↓ pts/segment", 2),
    ("win", "win rate vs base %", 1),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    ar = load(args.out / "eval-ar" / "eval.parquet")
    runs = by_method(ar)
    base = row(ar["base"])
    seeds = sorted({s for v in runs.values() for s, _ in v})
    n_eval = ar["base"]["world.overall"]["n"]
    p = print
    p("# Exposure bias on the tiny world: base, SCST, Self-Forcing, DPO\n")
    p("Written by `examples/tiny_ar/results_table.py` from `examples/tiny_ar/compare.sh`; read in docs/results.md.\n")
    frames, n_seg, listed = 16 * len(base["curve"]) + 1, len(base["curve"]), ", ".join(map(str, seeds))
    p(
        f"`tiny-ar`, trained at 33 frames (two chunks) on `world:align`, evaluated on {n_eval} videos of "
        f"`world:val` at {frames} frames ({n_seg} chunks); mean ± std over training seeds {listed}. "
        "Defects: the share of (clip, world check) failures; the slope is their change per 17-frame segment "
        "(positive: the video gets worse as it goes). CPU minutes: one training run.\n"
    )
    p("| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " | CPU min |")
    p("|---|" + "---|" * (len(COLUMNS) + 1))
    p(f"| base: {WHAT['base']} | " + " | ".join(cell([base[k]], d) for k, _, d in COLUMNS) + " | – |")
    for name in [m for m in ORDER if m in runs]:
        vals = runs[name]
        cpu = [minutes(args.out, name, s) for s, _ in vals]
        p(f"| {name}: {WHAT[name]} | " + " | ".join(cell([r[k] for _, r in vals], d) for k, _, d in COLUMNS)
          + f" | {cell(cpu, 1)} |")  # fmt: skip
    p("\nDefects per segment (%, mean over seeds):\n")
    p("| variant | " + " | ".join(f"seg {k + 1}" for k in range(len(base["curve"]))) + " |")
    p("|---|" + "---|" * len(base["curve"]))
    p("| base | " + " | ".join(f"{100 * v:.1f}" for v in base["curve"]) + " |")
    for name in [m for m in ORDER if m in runs]:
        curves = [r["curve"] for _, r in runs[name]]
        p(f"| {name} | " + " | ".join(f"{100 * statistics.fmean(c[k] for c in curves):.1f}"
                                       for k in range(len(base["curve"]))) + " |")  # fmt: skip
    # The expectations, tested on these numbers
    p("\nThe expectations, computed from the table:\n")
    for name in ("scst", "self-forcing-scst"):
        if name in runs:
            mean, std = stat([r["late"] for _, r in runs[name]])
            cut = base["late"] - mean
            z = cut / std if std and not math.isnan(std) else math.nan
            verdict = "holds" if z >= 3 else "does not hold"
            p(
                f"- {name} cuts last-segment defects by {cut:.1f} points, {z:.1f} seed stds ({std:.1f}): the "
                f"expected cut of at least 3 stds {verdict}."
            )
    bidir = args.out / "eval-bidir" / "eval.parquet"
    if bidir.is_file() and "scst" in runs:
        bd = load(bidir)
        b_base = bd["base"]["world.overall"]["mean"]
        b_runs = [r for _, r in by_method(bd).get("bidir-scst", [])]
        b_gain = stat([r["overall"] - b_base for r in b_runs])
        ar_gain = stat([r["overall"] - base["overall"] for _, r in runs["scst"]])
        b_win = stat([r["win"] for r in b_runs])
        p(f"- SCST's gain in world overall: {ar_gain[0]:+.4f} ± {ar_gain[1]:.4f} on `tiny-ar` (its own rollouts) "
          f"against {b_gain[0]:+.4f} ± {b_gain[1]:.4f} on the bidirectional `tiny` (17 frames, the same budget; "
          f"win rate vs its base {b_win[0]:.1f} ± {b_win[1]:.1f}%): larger on the autoregressive model "
          f"{'holds' if ar_gain[0] > b_gain[0] else 'does not hold'}.")  # fmt: skip


if __name__ == "__main__":
    main()
