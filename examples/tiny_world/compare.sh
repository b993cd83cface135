#!/usr/bin/env bash
# Methods comparison on the tiny world, in the shape of OnlineVPO's ablations: online vs offline DPO, curriculum
# vs fixed reference, K = 2/4/8 candidates at one sample budget, DPO vs ReFL vs SCST (group-mean and greedy
# baselines). Every variant starts from the shipped tiny base model, trains on world:align and runs once per
# training seed in SEEDS, so every figure is a mean with its seed spread. All final checkpoints are then evaluated
# together, with the same seeds, on world:val (training prompts no run trains on) and on world:heldout (unseen
# colour-shape-direction triples); results_table.py writes the tables to docs/results.md.
#
#   bash examples/tiny_world/compare.sh [OUT]      (SEEDS="0 1 2" EVAL_SEEDS=2 by default)
#
# Budgets are `vpotool loop`'s defaults; ITERS, PROMPTS (per iteration), K, STEPS (per iteration) and LR override
# them for every variant, SAMPLER adds sampler flags to every run and both evals (e.g. SAMPLER="--steps 4"), and
# VAL / HELDOUT replace the two eval prompt sets: together they make a quick check of the script. METHODS picks
# the variants to train (default all of them, by the names below); REF_INTERVALS="24 144" adds online DPO with
# those reference intervals (online-dpo-refN); EVAL=no trains without evaluating, so that several copies of the
# script can train different SEEDS at once (one process each) before one last run evaluates them all; RESULTS=none
# evaluates without writing the tables (for folders that also hold runs of other trainers).
# Every command resumes: rerunning the script after an interruption skips finished work.
set -euo pipefail
OUT=${1:-runs/compare}
SEEDS=${SEEDS:-"0 1 2"}
EVAL_SEEDS=${EVAL_SEEDS:-2}
VAL=${VAL:-world:val}
HELDOUT=${HELDOUT:-world:heldout}
RESULTS=${RESULTS:-docs/results.md}
ALL="online-dpo online-dpo-fixed-ref offline-dpo online-dpo-k2 online-dpo-k8 refl scst scst-greedy scst-nft scst-awm"
METHODS=${METHODS:-"$ALL scst-nft-loo scst-nft-kl scst-nft-old"}
REF_INTERVALS=${REF_INTERVALS:-}
EVAL=${EVAL:-yes}
read -ra SAMPLER <<< "${SAMPLER:-}"

# The loop's defaults, read from its config so that they are stated once.
read -r D_ITERS D_PROMPTS D_K D_STEPS BATCH D_LR RANK FRACTION REWARD TRAIN_PROMPTS < <(python -c '
from vpotool.training.config import LoopConfig
c = LoopConfig()
print(c.iterations, c.prompts_per_iter, c.candidates, c.steps_per_iter, c.batch_size * c.grad_accum, c.lr,
      c.lora_rank, c.train_fraction, c.reward, c.prompts)')
ITERS=${ITERS:-$D_ITERS}
PROMPTS=${PROMPTS:-$D_PROMPTS}
K=${K:-$D_K}
STEPS=${STEPS:-$D_STEPS}
LR=${LR:-$D_LR}
BUDGET=$((PROMPTS * K))  # videos sampled per iteration
# Flags only where the budget differs from the defaults, so that online DPO stays the bare `vpotool loop`.
scale=("${SAMPLER[@]}")
[[ $ITERS == "$D_ITERS" ]] || scale+=(--iterations "$ITERS")
[[ $PROMPTS == "$D_PROMPTS" ]] || scale+=(--prompts-per-iter "$PROMPTS")
[[ $K == "$D_K" ]] || scale+=(--candidates "$K")
[[ $STEPS == "$D_STEPS" ]] || scale+=(--steps-per-iter "$STEPS")
[[ $LR == "$D_LR" ]] || scale+=(--lr "$LR")

# timed NAME COMMAND...: run COMMAND (which writes $OUT/NAME); its wall time goes to $OUT/NAME/seconds, which marks
# the run done.
timed() {
  local name=$1 t0
  shift
  [[ -f "$OUT/$name/seconds" ]] && return
  t0=$(date +%s)
  "$@"
  echo $(($(date +%s) - t0)) > "$OUT/$name/seconds"
}
# run NAME [loop flags]: `vpotool loop` into $OUT/NAME-seedS for every training seed (if METHODS names it).
run() {
  local name=$1 s
  shift
  [[ " $METHODS $(printf 'online-dpo-ref%s ' $REF_INTERVALS)" == *" $name "* ]] || return 0
  for s in $SEEDS; do
    timed "$name-seed$s" vpotool loop --out "$OUT/$name-seed$s" --seed "$s" --eval-prompts none "${scale[@]}" "$@"
  done
}

# Online DPO: the default `vpotool loop` (curriculum reference, K candidates, pairs above the margin).
run online-dpo
# A fixed reference: the base model throughout.
run online-dpo-fixed-ref --ref-update-interval 0
# Other reference intervals (in optimizer steps), if asked for.
for interval in $REF_INTERVALS; do
  run "online-dpo-ref$interval" --ref-update-interval "$interval"
done
# Offline DPO: every video sampled once from the base model (one iteration over ITERS x PROMPTS prompts), then the
# same number of DPO steps with the same curriculum.
run offline-dpo --iterations 1 --prompts-per-iter $((ITERS * PROMPTS)) --steps-per-iter $((ITERS * STEPS))
# Candidates per prompt at the same budget of videos per iteration: K x prompts-per-iter = BUDGET.
run online-dpo-k2 --candidates 2 --prompts-per-iter $((BUDGET / 2))
run online-dpo-k8 --candidates 8 --prompts-per-iter $((BUDGET / 8))
# Reward gradients (ReFL, through the last denoising step) and self-critical policy gradient with the loop's
# group-mean baseline (the mean reward of a prompt's K candidates).
run refl --algo refl
run scst --algo scst --estimator logp
# Forward-process policy optimisation on the same K candidates (no log-probabilities, ODE rollouts): DiffusionNFT
# without a trust region (its old policy the current one), advantage-weighted flow matching, NFT with the
# leave-one-out baseline, NFT with a KL to the base model, and NFT whose old policy is the adapter that sampled the
# iteration's videos (the loop's default).
run scst-nft --algo scst --estimator nft --nft-old current
run scst-awm --algo scst --estimator awm
run scst-nft-loo --algo scst --estimator nft --nft-old current --baseline leave-one-out
run scst-nft-kl --algo scst --estimator nft --nft-old current --kl-beta 1
run scst-nft-old --algo scst --estimator nft --nft-old sampler
# SCST with the greedy baseline (the deterministic sample from the same noise) is not a loop option: train-scst
# runs it on the same prompts and reward with the loop's learning rate, LoRA rank and train fraction. Budget
# match: each of its optimizer steps samples BATCH stochastic rollouts and BATCH greedy ones, so
# ITERS x BUDGET / (2 x BATCH) steps sample the same ITERS x BUDGET videos as the loop's SCST (a third of the loop
# SCST's optimizer steps at the defaults, each on fresh on-policy rollouts instead of reused ones).
for s in $SEEDS; do
  [[ " $METHODS " == *" scst-greedy "* ]] || break
  timed "scst-greedy-seed$s" vpotool train-scst --out "$OUT/scst-greedy-seed$s" --seed "$s" \
    --prompts "$TRAIN_PROMPTS" --reward "$REWARD" --estimator logp --baseline greedy --lr "$LR" --lora-rank "$RANK" \
    --train-fraction "$FRACTION" --max-steps $((ITERS * BUDGET / (2 * BATCH))) "${SAMPLER[@]}"
done

[[ $EVAL == no ]] && exit 0
# Every finished run's final checkpoint, evaluated on both prompt sets with the same seeds.
adapters=()
for d in "$OUT"/*-seed*/; do
  [[ -f "${d}seconds" ]] || continue
  adapters+=(--adapter "$(ls -d "${d}"checkpoints/step-* | sort -V | tail -1)")
done
# evaluate NAME PROMPTS: into $OUT/NAME; redone (resuming its finished videos) when the checkpoints change. Its
# seconds add up over the passes, as each pass samples only the checkpoints new to it.
evaluate() {
  local dir=$OUT/$1 t0
  if [[ -f "$dir/seconds" && "$(cat "$dir/checkpoints" 2> /dev/null)" == "${adapters[*]}" ]]; then
    return
  fi
  t0=$(date +%s)
  vpotool eval "${adapters[@]}" --prompts "$2" --seeds "$EVAL_SEEDS" --out "$dir" "${SAMPLER[@]}"
  echo "${adapters[*]}" > "$dir/checkpoints"
  echo $(($(cat "$dir/seconds" 2> /dev/null || echo 0) + $(date +%s) - t0)) > "$dir/seconds"
}
evaluate eval-val "$VAL"
evaluate eval-heldout "$HELDOUT"
[[ $RESULTS == none ]] && exit 0
python examples/tiny_world/results_table.py "$OUT" > "$RESULTS"
echo "wrote $RESULTS"
