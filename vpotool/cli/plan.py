"""`vpotool plan STAGE [the stage's flags]`: the peak accelerator memory (and step time) of a stage, predicted from
its own code on a model built from configs alone, before any GPU time."""

import typer

from vpotool.cli.options import config_command
from vpotool.config import SampleConfig, ScoreConfig
from vpotool.training.config import DpoConfig, LoopConfig, ReflConfig, ScstConfig

app = typer.Typer(
    help="Predict a stage's peak GPU memory per process and its step time, and what each memory option would save, "
    "from the stage's own code on a model built from its configs (no weights read). E.g. vpotool plan train-dpo "
    "--model wan --model-path FOLDER --size 480p --gpu h100.",
    no_args_is_help=True,
)

GPU = typer.Option(None, "--gpu", help="A GPU to fit: h100, h200, a100, a100-40gb, l40s, rtx4090, ... or a memory "
                   "size such as 80GB (default: the visible GPU).")  # fmt: skip
JSON = typer.Option(False, "--json", help="Print the plan as JSON.")
SIZE_OPTIONS = {  # for stages whose config takes its video size from its inputs (pairs, samples)
    "frames": (int, typer.Option(None, "--frames", help="Frames of the videos (default: the model's).")),
    "height": (int, typer.Option(None, "--height", help="Height (default: the model's).")),
    "width": (int, typer.Option(None, "--width", help="Width (default: the model's).")),
    "size": (str, typer.Option(None, "--size", help="A size preset of the model, e.g. 480p.")),
}
PLANNED = {
    "sample": (SampleConfig, {"prompts": "world:align", "out": "plan"}, {}),
    "score": (ScoreConfig, {"samples": "-", "out": "plan"}, {k: v for k, v in SIZE_OPTIONS.items() if k != "size"}),
    "train-dpo": (DpoConfig, {"out": "plan", "pairs": "-"}, SIZE_OPTIONS),
    "train-refl": (ReflConfig, {"out": "plan", "prompts": "world:align"}, {}),
    "train-scst": (ScstConfig, {"out": "plan", "prompts": "world:align"}, {}),
    "loop": (LoopConfig, {}, {}),
}
for stage, (cls, fill, sizes) in PLANNED.items():
    extra = {"gpu": (str, GPU), "json_out": (bool, JSON), **sizes}
    app.command(stage)(
        config_command(
            cls,
            "vpotool.stages.plan:run_plan",
            f"Plan `vpotool {stage}` with these flags: peak memory "
            "per process by part, fit on --gpu, step time, and each memory option's saving.",
            extra=extra,
            fill=fill,
            bind={"stage": stage},
        )  # fmt: skip
    )
