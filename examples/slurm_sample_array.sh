#!/usr/bin/env bash
# Sample and score in a SLURM array (one shard per task), then merge:
#   sbatch --array=0-7 examples/slurm_sample_array.sh runs/big
#   vpotool merge runs/big/samples-*-of-00008.parquet --out runs/big/samples.parquet
#   vpotool merge runs/big/scores-*-of-00008.parquet --out runs/big/scores.parquet
#SBATCH --job-name=vpotool-sample
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
set -euo pipefail
RUN=${1:?run folder}
N=${SLURM_ARRAY_TASK_COUNT:?run as an array job}
I=${SLURM_ARRAY_TASK_ID}
vpotool sample --config examples/sample_wan.yaml --out "$RUN" --shard "$I/$N"
SUFFIX=$(printf -- "-%05d-of-%05d" "$I" "$N")
vpotool score --samples "$RUN/samples$SUFFIX.parquet" --reward temporal --out "$RUN/scores$SUFFIX.parquet"
