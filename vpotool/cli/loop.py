"""`vpotool loop`: the online sample-score-pair-train loop (OnlineVPO) in one process."""

from vpotool.cli.options import config_command
from vpotool.training.config import LoopConfig

command = config_command(
    LoopConfig,
    "vpotool.stages.loop:run_loop",
    "Align a model online: each iteration samples K candidates per prompt, scores, pairs and trains -> RUN/.",
    short={"candidates": "-k"},
)
