"""Subcommands whose capability has not landed yet: they exit non-zero with one clear line."""

from __future__ import annotations

import typer

PENDING = {
    "eval": "evaluation against the base model",
    "loop": "the online sample-score-pair-train loop",
}


def register(app: typer.Typer) -> None:
    for name, what in PENDING.items():

        def command(ctx: typer.Context, _name: str = name, _what: str = what):
            typer.secho(f"error: vpotool {_name} ({_what}) is not available yet in vpotool", fg="red", err=True)
            raise typer.Exit(2)

        command.__doc__ = f"{what[0].upper()}{what[1:]} (not available yet)."
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
