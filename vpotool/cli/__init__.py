"""The ``vpotool`` command line: one module per subcommand, registered here. Heavy imports (torch, diffusers)
happen inside command bodies, so ``vpotool --help`` answers instantly."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import typer

from vpotool import __version__
from vpotool.cli import eval as evaluate
from vpotool.cli import label, loop, merge, pair, plan, report, sample, score, train_dpo, train_refl, train_scst
from vpotool.errors import VpoError, one_line

app = typer.Typer(
    name="vpotool",
    help="Align text-to-video diffusion models with preference and reward feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = [
    ("sample", sample.command),
    ("score", score.command),
    ("pair", pair.command),
    ("label", label.command),
    ("merge", merge.command),
    ("train-dpo", train_dpo.command),
    ("train-refl", train_refl.command),
    ("train-scst", train_scst.command),
    ("loop", loop.command),
    ("eval", evaluate.command),
    ("report", report.command),
]
for name, fn in COMMANDS:
    app.command(name)(fn)
app.add_typer(plan.app, name="plan")


def _version(value: bool):
    if value:
        typer.echo(f"vpotool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show version.")):
    """Align text-to-video diffusion models with preference and reward feedback."""


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: user errors become one red line and exit status 2, never a traceback."""
    try:  # typer >= 0.26 raises its own bundled copy of click's exceptions
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    # SIGTERM (torchrun stopping a launch's other processes when one fails, SLURM preempting a job) unwinds as
    # Ctrl-C does, so that locks and temporary files are released on the way out instead of left behind
    if threading.current_thread() is threading.main_thread():  # (the only thread that may set a handler)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False, prog_name="vpotool")
    except VpoError as e:
        typer.secho(f"error: {one_line(e)}", fg="red", err=True)
        leave(2)
    except click_errors.ClickException as e:  # usage errors: one line (click prints three), click's exit status
        typer.secho(f"error: {usage_line(e)}", fg="red", err=True)
        leave(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.secho("interrupted: finished rows are saved; rerun the same command to resume", fg="yellow", err=True)
        leave(130)
    if code == 130:  # typer turns Ctrl-C inside a command into exit status 130
        typer.secho("interrupted: finished rows are saved; rerun the same command to resume", fg="yellow", err=True)
    leave(code if isinstance(code, int) else 0)


def usage_line(e) -> str:
    """A click error as one line naming the command and where its help is, e.g. ``vpotool sample: No such option:
    --foo; see vpotool sample --help`` (click prints a usage line, a hint and the error on three)."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "vpotool"
    return f"{command}: {one_line(e.format_message()).rstrip('.')}; see {command} --help"


def leave(code: int) -> NoReturn:
    """Exit with ``code``. A worker that torchrun (or accelerate launch, through it) started among several skips the
    interpreter's teardown: by then its files are written and closed and its process group is destroyed, while
    native thread pools (gloo's, Arrow's) now and then abort in their destructors at exit ("terminate called without
    an active exception"), which would fail a finished run with SIGABRT."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
