"""`vpotool label`: a local web page to label which of two videos is better -> labels.parquet."""

from vpotool.cli.options import config_command
from vpotool.config import LabelConfig

command = config_command(
    LabelConfig,
    "vpotool.report.label:run_label",
    "Label pairs of videos in a browser (left, right, tie or skip), or with a pairwise video judge (--judge) -> "
    "labels.parquet; then `pair --labels`.",
)
