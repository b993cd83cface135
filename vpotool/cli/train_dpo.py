"""`vpotool train-dpo`: Diffusion-DPO on a pairs manifest, with the curriculum reference update (OnlineVPO)."""

from vpotool.cli.options import config_command
from vpotool.training.config import DpoConfig

command = config_command(
    DpoConfig,
    "vpotool.training.dpo:train_dpo",
    "Train a LoRA adapter with Diffusion-DPO on pairs.parquet -> OUT/checkpoints/step-N, OUT/metrics.parquet.",
    run_folder=True,
)
