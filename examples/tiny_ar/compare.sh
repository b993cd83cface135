#!/usr/bin/env bash
# Exposure bias and its fixes on the tiny autoregressive model, in the shape of the comparison the autoregressive
# source makes (base, + SCST, + DPO) with Self-Forcing and the teacher-forcing control added. Every variant starts
# from the shipped tiny-ar model (teacher-forced), trains on world:align with the world reward at 33 frames (two
# chunks: the second one sees the first), once per training seed in SEEDS; all final checkpoints are evaluated
# together at EVAL_FRAMES (65: four chunks, four times the sampling length) on world:val, and
# results_table.py writes docs/results-ar.md.
#
#   bash examples/tiny_ar/compare.sh [OUT]          (SEEDS="0 1 2" by default)
#
# Variants (each SCST run is train-scst with the greedy baseline, the advantage normalised over the batch):
#   scst               per-video advantage, each chunk beside the chunks the model made (its own rollouts)
#   self-forcing-scst  the same rollouts, each chunk's steps credited with its advantage to go (--advantage chunk)
#   teacher-scst       per-video advantage, each chunk beside the rendered clip (--context teacher): the control
#   online-dpo         vpotool loop --algo dpo on the model's rollouts, the same number of sampled videos
#   scst-then-dpo      the scst run's adapter, then the online-dpo run (--init-adapter): twice the compute
#   bidir-scst         the bidirectional tiny model's scst at its 17 frames, evaluated against its own base
# SCST's S steps sample 2 x BATCH x S videos (sample and greedy); the loop samples ITERS x PROMPTS x 4.
# Every command resumes: rerunning the script after an interruption skips finished work. Beside other work on a
# small CPU, OMP_NUM_THREADS=1 keeps its threads from spinning against the others' (the figures of docs/results-ar.md).
set -euo pipefail
OUT=${1:-runs/compare-ar}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-24}          # optimizer steps of each SCST run and of each DPO run
BATCH=${BATCH:-4}
LR=${LR:-1e-3}
ITERS=${ITERS:-4}
PROMPTS=$((STEPS * 2 * BATCH / ITERS / 4))  # loop prompts per iteration at K = 4: the SCST run's video budget
EVAL_PROMPTS=${EVAL_PROMPTS:-world:val}
EVAL_SEEDS=${EVAL_SEEDS:-1}
EVAL_FRAMES=${EVAL_FRAMES:-65}
RESULTS=${RESULTS:-docs/results-ar.md}
VARIANTS=${VARIANTS:-"scst self-forcing-scst teacher-scst online-dpo scst-then-dpo bidir-scst"}  # a subset: run these
EVAL=${EVAL:-1}  # 0: train only (e.g. a second instance on another core, with other VARIANTS)
read -ra SAMPLER <<< "${SAMPLER:---steps 10}"  # every run and eval: 10 sampler steps (half the default)
AR=(--model tiny-ar --frames 33 "${SAMPLER[@]}")

timed() {  # timed NAME COMMAND...: run COMMAND (which writes $OUT/NAME); its seconds in $OUT/NAME/seconds mark it done
  local name=$1 t0
  shift
  [[ -f "$OUT/$name/seconds" ]] && return
  t0=$(date +%s)
  "$@"
  echo $(($(date +%s) - t0)) > "$OUT/$name/seconds"
}
wanted() { [[ " $VARIANTS " == *" $1 "* ]]; }
scst() {  # scst NAME [train-scst flags]
  local name=$1 s
  shift
  wanted "$name" || return 0
  for s in $SEEDS; do
    timed "$name-seed$s" vpotool train-scst --out "$OUT/$name-seed$s" --seed "$s" --prompts world:align \
      --reward world --baseline greedy --normalize --lr "$LR" --lora-rank 8 --train-fraction 0.5 \
      --batch-size "$BATCH" --max-steps "$STEPS" "$@"
  done
}
dpo() {  # dpo NAME [loop flags]
  local name=$1 s
  shift
  wanted "$name" || return 0
  for s in $SEEDS; do
    timed "$name-seed$s" vpotool loop --out "$OUT/$name-seed$s" --seed "$s" --eval-prompts none "${AR[@]}" \
      --iterations "$ITERS" --prompts-per-iter "$PROMPTS" --candidates 4 --steps-per-iter $((STEPS / ITERS)) \
      "${@//SEED/$s}"
  done
}
last() { ls -d "$1"/checkpoints/step-* | sort -V | tail -1; }

scst scst "${AR[@]}"
scst self-forcing-scst "${AR[@]}" --advantage chunk
scst teacher-scst "${AR[@]}" --context teacher
dpo online-dpo
dpo scst-then-dpo --init-adapter "$OUT/scst-seedSEED/checkpoints/step-$STEPS"
scst bidir-scst --model tiny --frames 17 "${SAMPLER[@]}"

[[ $EVAL == 1 ]] || exit 0

# evaluate NAME MODEL FRAMES GLOB: every finished run matching GLOB against MODEL's base, in $OUT/NAME
evaluate() {
  local name=$1 model=$2 frames=$3 glob=$4 adapters=() d t0
  for d in "$OUT"/$glob/; do
    [[ -f "${d}seconds" ]] && adapters+=(--adapter "$(last "$d")")
  done
  [[ -f "$OUT/$name/seconds" && "$(cat "$OUT/$name/checkpoints" 2> /dev/null)" == "${adapters[*]}" ]] && return
  t0=$(date +%s)
  vpotool eval --model "$model" --frames "$frames" "${SAMPLER[@]}" "${adapters[@]}" --prompts "$EVAL_PROMPTS" \
    --seeds "$EVAL_SEEDS" --out "$OUT/$name"
  echo "${adapters[*]}" > "$OUT/$name/checkpoints"
  echo $(($(cat "$OUT/$name/seconds" 2> /dev/null || echo 0) + $(date +%s) - t0)) > "$OUT/$name/seconds"
}
evaluate eval-ar tiny-ar "$EVAL_FRAMES" "[!b]*-seed*"
evaluate eval-bidir tiny 17 "bidir-scst-seed*"
python examples/tiny_ar/results_table.py "$OUT" > "$RESULTS"
echo "wrote $RESULTS"
