"""`vpotool score`: run video reward models over a samples manifest."""

from vpotool.cli.options import config_command
from vpotool.config import ScoreConfig

command = config_command(
    ScoreConfig,
    "vpotool.stages.score:run_score",
    "Score every sample with one or more rewards -> scores.parquet (one row per sample and reward).",
)
