"""`vpotool train-scst`: self-critical policy-gradient training."""

from vpotool.cli.options import config_command
from vpotool.training.config import ScstConfig

command = config_command(
    ScstConfig,
    "vpotool.training.scst:train_scst",
    "Train a LoRA adapter with self-critical policy gradients (greedy or group-mean baseline) -> OUT/checkpoints.",
    run_folder=True,
)
