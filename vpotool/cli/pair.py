"""`vpotool pair`: preference pairs from scores."""

from __future__ import annotations

import typer

from vpotool.config import PairConfig, build_config, doc


def _o(name: str, *flags: str):
    return typer.Option(None, *flags, help=doc(PairConfig, name))


def command(
    samples: str = _o("samples", "--samples"),
    scores: str = _o("scores", "--scores"),
    out: str = _o("out", "--out"),
    reward: str = _o("reward", "--reward"),
    dimension: str = _o("dimension", "--dimension"),
    strategy: str = _o("strategy", "--strategy"),
    min_margin: float = _o("min_margin", "--min-margin"),
    config: str = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Build (chosen, rejected) pairs per prompt from scores -> pairs.parquet."""
    flags = dict(locals())
    flags.pop("config")
    cfg = build_config(PairConfig, config, **flags)
    from vpotool.stages.pair import run_pair

    typer.echo(f"wrote {run_pair(cfg)}")
