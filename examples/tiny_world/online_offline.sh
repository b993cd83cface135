#!/usr/bin/env bash
# OnlineVPO's central claim, online against offline DPO, at a budget where the policy moves away from the base
# model: compare.sh's DPO variants at learning rate LR (default 0.001, five times the loop's default), three
# training seeds each, with the same videos and steps; online DPO with its reference renewed every round (24 steps,
# INTERVALS), every second round (48, the default) or never (a fixed reference; OnlineVPO compared 100, 200 and
# 400 steps at its own run length); and K = 2 / 4 / 8. Then how far each online run's policy
# moved from the base round by round (movement.py), for these runs and one bare `vpotool loop` at the default rate.
#
#   bash examples/tiny_world/online_offline.sh [OUT]      (OUT: runs/online-offline; results in OUT/results.md)
#
# Two copies of compare.sh train at once (one core each), then one pass evaluates every run on world:val and
# world:heldout. Every step resumes; each run's wall seconds are in its `seconds` file.
set -euo pipefail
OUT=${1:-runs/online-offline}
HERE=$(dirname "$0")
export LR=${LR:-0.001} SEEDS=${SEEDS:-"0 1 2"} RESULTS=${RESULTS:-$OUT/results.md}
DPO="online-dpo offline-dpo online-dpo-fixed-ref online-dpo-k2 online-dpo-k8"
INTERVALS=${INTERVALS:-24}
mkdir -p "$OUT"

OMP_NUM_THREADS=1 EVAL=no METHODS="online-dpo offline-dpo online-dpo-fixed-ref" \
  bash "$HERE/compare.sh" "$OUT" &
first=$!
OMP_NUM_THREADS=1 EVAL=no METHODS="online-dpo-k2 online-dpo-k8" REF_INTERVALS="$INTERVALS" \
  bash "$HERE/compare.sh" "$OUT" &
second=$!
wait $first
wait $second
METHODS="$DPO" REF_INTERVALS="$INTERVALS" bash "$HERE/compare.sh" "$OUT"  # trains nothing more: evaluates

# The same movement figure for the bare loop at its default learning rate, for contrast.
if [[ ! -f "$OUT/default-lr-seed0/seconds" ]]; then
  t0=$(date +%s)
  vpotool loop --out "$OUT/default-lr-seed0" --seed 0 --eval-prompts none
  echo $(($(date +%s) - t0)) > "$OUT/default-lr-seed0/seconds"
fi
if [[ ! -f "$OUT/movement.parquet" ]]; then
  t0=$(date +%s)
  python "$HERE/movement.py" "$OUT"/online-dpo-seed* "$OUT/default-lr-seed0" --out "$OUT/movement.parquet"
  echo $(($(date +%s) - t0)) > "$OUT/movement.seconds"
fi
echo "wrote $RESULTS and $OUT/movement.parquet"
