"""Print budget.sh's table (markdown): per checkpoint of the long run, the late-segment defects, the defect slope,
world overall and win rate against the base on world:val at 65 frames, and the mean training rewards (of the
stochastic rollouts and of the greedy ones, the policy's own) of the steps since the previous checkpoint
(metrics.parquet).

    python examples/tiny_ar/budget_table.py runs/budget-ar runs/budget-ar/self-forcing-scst-seed0
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
from results_table import load, row  # this folder's comparison table: the same columns, computed the same way


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="budget.sh's OUT (holds eval/)")
    ap.add_argument("run", type=Path, help="the training run (holds metrics.parquet)")
    args = ap.parse_args(argv)
    evals = load(args.out / "eval" / "eval.parquet")
    metrics = [r for r in pq.read_table(args.run / "metrics.parquet").to_pylist() if r.get("reward") is not None]
    reward = {r["step"]: (r["reward"], r["baseline_reward"]) for r in metrics}
    steps = {int(re.search(r"step-(\d+)", k)[1]): k for k in evals if "step-" in k}
    base = row(evals["base"])
    print("| steps | training reward, sampled / greedy (mean since last row) | last-segment defects ↓ % "
          "| defect slope pts/segment | world overall | win rate vs base % |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| 0 (base) | – | {base['late']:.1f} | {base['slope']:.2f} | {base['overall']:.4f} | 50.0 |")
    prev = 0
    for s in sorted(steps):
        r = row(evals[steps[s]])
        since = [v for k, v in reward.items() if prev < k <= s] or [(float("nan"),) * 2]
        sampled, greedy = (statistics.fmean(x) for x in zip(*since, strict=True))
        print(f"| {s} | {sampled:.3f} / {greedy:.3f} | {r['late']:.1f} | {r['slope']:.2f} | {r['overall']:.4f} | "
              f"{r['win']:.1f} |")  # fmt: skip
        prev = s


if __name__ == "__main__":
    main()
