#!/usr/bin/env bash
# Is the budget why compare.sh's SCST variants leave tiny-ar's drift where it was? One Self-Forcing + SCST run
# (own rollouts, per-chunk advantage to go: compare.sh's self-forcing-scst, the same flags) at STEPS optimizer
# steps, ten times compare.sh's 24 by default, with a checkpoint every STEPS / 5; every checkpoint is evaluated
# with the base on world:val at 65 frames as compare.sh evaluates, and budget_table.py prints late-segment defects
# and the training reward against steps (docs/results.md, "Why nothing moved").
#
#   OMP_NUM_THREADS=1 bash examples/tiny_ar/budget.sh [OUT]      (about 70 CPU minutes on one core)
set -euo pipefail
OUT=${1:-runs/budget-ar}
STEPS=${STEPS:-240}
SEED=${SEED:-0}
VARIANT=${VARIANT:-self-forcing-scst}
read -ra SAMPLER <<< "${SAMPLER:---steps 10}"
case $VARIANT in
  self-forcing-scst) FLAGS=(--advantage chunk) ;;
  scst) FLAGS=() ;;
  teacher-scst) FLAGS=(--context teacher) ;;
  *) echo "VARIANT must be self-forcing-scst, scst or teacher-scst" >&2; exit 2 ;;
esac
RUN=$OUT/$VARIANT-seed$SEED
if [[ ! -f $RUN/seconds ]]; then
  t0=$(date +%s)
  vpotool train-scst --out "$RUN" --seed "$SEED" --prompts world:align --reward world --baseline greedy --normalize \
    --lr 1e-3 --lora-rank 8 --train-fraction 0.5 --batch-size 4 --max-steps "$STEPS" --save-every $((STEPS / 5)) \
    --model tiny-ar --frames 33 "${SAMPLER[@]}" "${FLAGS[@]}"
  echo $(($(date +%s) - t0)) > "$RUN/seconds"
fi
adapters=()
for c in $(ls -d "$RUN"/checkpoints/step-* | sort -V); do adapters+=(--adapter "$c"); done
if [[ ! -f $OUT/eval/seconds ]]; then
  t0=$(date +%s)
  vpotool eval --model tiny-ar --frames 65 "${SAMPLER[@]}" "${adapters[@]}" --prompts world:val --seeds 1 \
    --out "$OUT/eval"
  echo $(($(date +%s) - t0)) > "$OUT/eval/seconds"
fi
python examples/tiny_ar/budget_table.py "$OUT" "$RUN"
