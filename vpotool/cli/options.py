"""Build a subcommand from a stage config dataclass: one ``--flag`` per field (help from the field; a bool field
gets ``--flag/--no-flag``), plus ``--config FILE.yaml``; the body resolves the config and calls one library
function, imported lazily."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os

import typer

from vpotool.config import build_config, flag

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _python_type(annotation: str):
    parts = [p.strip() for p in str(annotation).split("|") if p.strip() != "None"]
    return _TYPES.get(parts[0], str)


def config_command(
    cls,
    runner: str,
    summary: str,
    short: dict[str, str] | None = None,
    run_folder: bool = False,
    extra: dict[str, tuple] | None = None,
    fill: dict | None = None,
    bind: dict | None = None,
):
    """A typer command for config class ``cls`` that runs ``runner`` (``"module:function"``) on the resolved
    config and prints the path it returns. ``short`` adds short flags, e.g. ``{"candidates": "-k"}``.
    ``run_folder``: ``--out`` is a run folder the runner does not check itself (the trainers); it is checked to be a
    writable folder and locked for the run, so a read-only folder or a second run there stops with one line.
    ``extra``: options beyond the config's, ``{name: (annotation, typer.Option)}``, passed to the runner as keywords
    with ``bind``'s; ``fill``: values for options that were not given (``vpotool plan`` needs no ``--out``)."""
    short, extra, fill, bind = short or {}, extra or {}, fill or {}, bind or {}

    def command(**kwargs):
        config_file = kwargs.pop("config")
        more = {name: kwargs.pop(name) for name in extra}
        kwargs.update({k: v for k, v in fill.items() if kwargs.get(k) is None})
        cfg = build_config(cls, config_file, **kwargs)
        module, fn = runner.split(":")
        run = getattr(importlib.import_module(module), fn)
        if extra or bind:
            run(cfg, **bind, **more)
            return
        if run_folder:
            from vpotool.stages.common import output_folder, writer_lock

            with writer_lock(output_folder(cfg.out)):
                written = run(cfg)
        else:
            written = run(cfg)
        if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, the main process reports
            typer.echo(f"wrote {written}")

    params = []
    for f in dataclasses.fields(cls):
        annotation = _python_type(f.type)
        # A bool gets both --x and --no-x: either may override a YAML file (resume: false) or a default of True.
        names = [flag(f.name) + (f"/--no-{flag(f.name)[2:]}" if annotation is bool else "")]
        names += [short[f.name]] if f.name in short else []
        option = typer.Option(None, *names, help=f.metadata["help"])
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=option, annotation=annotation))
    for name, (annotation, option) in extra.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    config = typer.Option(None, "--config", help="YAML file of options; flags override it.")
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str))
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = summary
    return command
