#!/usr/bin/env bash
# Methods comparison on the tiny world, in the shape of OnlineVPO's ablations: online vs offline DPO,
# curriculum vs fixed reference, K = 2/4/8 candidates, DPO vs ReFL vs SCST. Every run starts from the
# shipped tiny base model and sees the same number of sampled videos (ITERS x 32); each is then
# evaluated on the 60 held-out prompts with the same seeds, and the table goes to docs/results.md.
#
#   bash examples/tiny_world/compare.sh [OUT]      (ITERS=12 SEEDS="0 1 2" EVAL_SEEDS=2 by default)
#
# Every command resumes: rerunning the script after an interruption skips finished work.
set -euo pipefail
OUT=${1:-runs/compare}
ITERS=${ITERS:-12}
SEEDS=${SEEDS:-"0 1 2"}
EVAL_SEEDS=${EVAL_SEEDS:-2}
RESULTS=${RESULTS:-docs/results.md}
BUDGET=32  # videos sampled per iteration: prompts-per-iter x candidates
# run NAME [loop flags]: one loop into $OUT/NAME; its wall time goes to $OUT/NAME/seconds, which marks it done.
run() {
  local name=$1 t0
  shift
  [[ -f "$OUT/$name/seconds" ]] && return
  t0=$(date +%s)
  vpotool loop --out "$OUT/$name" --iterations "$ITERS" --steps-per-iter 8 --eval-prompts none "$@"
  echo $(($(date +%s) - t0)) > "$OUT/$name/seconds"
}
start=$(date +%s)

# Online DPO with the curriculum reference (the default `vpotool loop`), over several training seeds.
for s in $SEEDS; do
  run online-dpo-seed$s --seed "$s"
done
# Online DPO with a fixed reference: the base model throughout.
run online-dpo-fixed-ref --ref-update-interval 0
# Offline DPO: every pair sampled once from the base model (one iteration with all the prompts), then the
# same number of DPO steps with the same curriculum.
run offline-dpo --iterations 1 --prompts-per-iter $((ITERS * BUDGET / 4)) \
  --steps-per-iter $((ITERS * 8))
# Number of candidates at the same budget: K x prompts-per-iter = 32.
run online-dpo-k2 --candidates 2 --prompts-per-iter $((BUDGET / 2))
run online-dpo-k8 --candidates 8 --prompts-per-iter $((BUDGET / 8))
# Reward gradients (ReFL/VADER, the last denoising step) and self-critical policy gradient.
run refl --algo refl
run scst --algo scst

adapters=()
for d in "$OUT"/*/; do
  [[ -f "${d}seconds" ]] || continue
  adapters+=(--adapter "$(ls -d "${d}"checkpoints/step-* | sort -V | tail -1)")
done
vpotool eval "${adapters[@]}" --prompts world:heldout --seeds "$EVAL_SEEDS" --out "$OUT/eval"
python examples/tiny_world/results_table.py "$OUT" --minutes $((($(date +%s) - start) / 60)) > "$RESULTS"
echo "wrote $RESULTS"
