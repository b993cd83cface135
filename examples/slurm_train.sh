#!/usr/bin/env bash
# vpotool train-dpo (or loop) over several nodes of a SLURM allocation, one `accelerate launch` per node:
#   sbatch --nodes=2 examples/slurm_train.sh train-dpo --model wan --model-path DIR --pairs runs/x/pairs.parquet \
#     --out runs/x/dpo --dtype bfloat16 --mixed-precision bf16
# The machine rank and the main node's address come from SLURM's variables; every node runs 8 processes (one per
# GPU). Only rank 0 writes checkpoints, metrics and manifests; a rerun of the same command resumes. Set
# ACCELERATE_CONFIG=examples/accelerate/fsdp.yaml (or deepspeed_zero2.yaml) to shard; the default is DDP.
#SBATCH --job-name=vpotool-train
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
LAUNCH=(--multi_gpu)
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then LAUNCH=(--config_file "$ACCELERATE_CONFIG"); fi
ARGS=$(printf '%q ' "$@")  # the vpotool command, quoted for the per-node shell
srun --kill-on-bad-exit=1 bash -c "accelerate launch ${LAUNCH[*]} \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT \
  --rdzv_backend static -m vpotool $ARGS"
