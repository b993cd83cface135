"""`vpotool eval`: the base model and adapter checkpoints on held-out prompts -> OUT/eval.parquet and a table."""

from __future__ import annotations

import inspect

import typer

from vpotool.cli.options import config_command
from vpotool.config import EvalConfig

_command = config_command(
    EvalConfig,
    "vpotool.stages.eval:run_eval",
    "Sample, score and compare the base model and each --adapter checkpoint on held-out prompts -> OUT/eval.parquet.",
)

# One flag differs from the generated ones: --adapter repeats (the config keeps one comma-separated string, as a
# YAML file may also give it).
_OVERRIDES = {
    "adapters": (
        typer.Option(
            None,
            "--adapter",
            help="A LoRA checkpoint folder (checkpoints/step-N) to compare with the base model; repeat the flag "
            "for several (a comma-separated list works too).",
        ),
        list[str],
    ),
}


def command(**kwargs):
    adapters = kwargs.pop("adapters")
    kwargs["adapters"] = ",".join(adapters) if adapters else None
    _command(**kwargs)


_params = []
for _p in inspect.signature(_command).parameters.values():
    if _p.name in _OVERRIDES:
        _p = _p.replace(default=_OVERRIDES[_p.name][0], annotation=_OVERRIDES[_p.name][1])
    _params.append(_p)
command.__signature__ = inspect.Signature(_params)
command.__doc__ = _command.__doc__
