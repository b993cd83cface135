"""`vpotool sample`: K candidate videos per prompt from a model (and optional adapter)."""

from vpotool.cli.options import config_command
from vpotool.config import SampleConfig

command = config_command(
    SampleConfig,
    "vpotool.stages.sample:launch_sample",
    "Sample K candidate videos per prompt -> OUT/samples.parquet, OUT/videos/*.mp4, OUT/latents/.",
    short={"candidates": "-k"},
)
