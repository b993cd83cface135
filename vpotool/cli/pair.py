"""`vpotool pair`: preference pairs from scores."""

from vpotool.cli.options import config_command
from vpotool.config import PairConfig

command = config_command(
    PairConfig,
    "vpotool.stages.pair:run_pair",
    "Build (chosen, rejected) pairs per prompt from scores -> pairs.parquet.",
)
