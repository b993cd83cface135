#!/usr/bin/env bash
# OnlineVPO's central claim, online against offline DPO, at a budget where the policy moves away from the base
# model: compare.sh's DPO variants at learning rate LR (default 0.001, five times the loop's default), three
# training seeds each, with the same videos and steps; online DPO with its reference renewed every 24, 48 (the
# default) or 96 steps (INTERVALS: half and twice the default, as OnlineVPO compared 100, 200 and 400 steps around
# its best) or never (a fixed reference); and K = 2 / 4 / 8. Then how far each online run's policy moved from the
# base round by round (movement.py), for these runs and one bare `vpotool loop` at the default rate;
# and why online's lead is what it is (pair_gradients.py: how much of a DPO step is signal, and whether offline
# pairs still point where fresh ones do, early and late in an online and an offline run).
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
INTERVALS=${INTERVALS:-"24 96"}
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

# timed FILE COMMAND...: run COMMAND unless FILE exists; FILE then holds its wall seconds and marks it done.
timed() {
  local file=$1 t0
  shift
  [[ -f "$file" ]] && return
  t0=$(date +%s)
  "$@"
  echo $(($(date +%s) - t0)) > "$file"
}

# The same movement figure for the bare loop at its default learning rate, for contrast (in OUT/default-lr: a name
# without "-seed", which compare.sh would evaluate and tabulate with the comparison).
timed "$OUT/default-lr/seconds" vpotool loop --out "$OUT/default-lr" --seed 0 --eval-prompts none
timed "$OUT/movement.seconds" \
  python "$HERE/movement.py" "$OUT"/online-dpo-seed* "$OUT/default-lr" --out "$OUT/movement.parquet"

# Why online's lead is not larger. Offline seed 0's pairs trained again by train-dpo with training seeds 0 to 4
# (seed 0 is the same run: its last checkpoint equals the loop's; the others another LoRA initialisation, batch
# order, timesteps and noises), with a checkpoint every 48 steps.
WHY=$OUT/why
read -r steps interval rank < <(awk '/^max_steps:/{s=$2} /^ref_update_interval:/{i=$2} /^lora_rank:/{r=$2}
  END{print s, i, r}' "$OUT/offline-dpo-seed0/loop.yaml")
for s in 0 1 2 3 4; do
  timed "$WHY/same-pairs-seed$s/seconds" vpotool train-dpo --pairs "$OUT/offline-dpo-seed0/iter-0000/pairs.parquet" \
    --out "$WHY/same-pairs-seed$s" --lr "$LR" --max-steps "$steps" --lora-rank "$rank" \
    --ref-update-interval "$interval" --save-every 48 --seed "$s" --device cpu
done
# How much of a DPO step is signal, and whether offline pairs still point where fresh ones do, early and late in
# the online and the offline run (pair_gradients.py; OUT/why/figures.md).
timed "$WHY/figures.seconds" python "$HERE/pair_gradients.py" "$OUT/online-dpo-seed0/checkpoints/step-"{48,"$steps"} \
  "$WHY/same-pairs-seed0/checkpoints/step-"{48,"$steps"} --prompts 64 \
  --offline "$OUT/offline-dpo-seed0/iter-0000/pairs.parquet" --out "$WHY"
# Where the seed spread comes from: the five training seeds on one set of pairs against five offline seeds that
# each sample their own pairs (the comparison's three, and seeds 3 and 4 trained into WHY), all evaluated as above.
METHODS=offline-dpo SEEDS="3 4" RESULTS=none bash "$HERE/compare.sh" "$WHY"
echo "wrote $RESULTS, $OUT/movement.parquet, $WHY/figures.md and $WHY/eval-*"
