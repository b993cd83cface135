"""`vpotool train-refl`: reward-gradient fine-tuning (ReFL / VADER)."""

from vpotool.cli.options import config_command
from vpotool.training.config import ReflConfig

command = config_command(
    ReflConfig,
    "vpotool.training.refl:train_refl",
    "Fine-tune a LoRA adapter on the gradient of a differentiable reward -> OUT/checkpoints, OUT/metrics.parquet.",
    run_folder=True,
)
