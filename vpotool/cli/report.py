"""`vpotool report`: a static HTML page (curves, eval table, pair gallery) of a run folder or one manifest."""

from __future__ import annotations

import inspect

import typer

from vpotool.cli.options import config_command
from vpotool.config import ReportConfig, doc

command = config_command(
    ReportConfig,
    "vpotool.report.html:build_report",
    "Write a static HTML report of a run folder, or of a pairs or samples manifest -> RUN/report/index.html.",
)

# The run folder or manifest is a positional argument (`vpotool report RUN`), not a --path flag.
_path = typer.Argument(..., metavar="RUN_OR_MANIFEST", help=doc(ReportConfig, "path"), show_default=False)
_params = inspect.signature(command).parameters.values()
command.__signature__ = inspect.Signature([p.replace(default=_path) if p.name == "path" else p for p in _params])
