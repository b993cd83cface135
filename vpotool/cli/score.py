"""`vpotool score`: run video reward models over a samples manifest."""

from __future__ import annotations

import typer

from vpotool.config import ScoreConfig, build_config, doc


def _o(name: str, *flags: str):
    return typer.Option(None, *flags, help=doc(ScoreConfig, name))


def command(
    samples: str = _o("samples", "--samples"),
    out: str = _o("out", "--out"),
    reward: str = _o("reward", "--reward"),
    reward_path: str = _o("reward_path", "--reward-path"),
    batch_size: int = _o("batch_size", "--batch-size"),
    device: str = _o("device", "--device"),
    dtype: str = _o("dtype", "--dtype"),
    shard: str = _o("shard", "--shard"),
    config: str = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Score every sample with one or more rewards -> scores.parquet (one row per sample and reward)."""
    flags = dict(locals())
    flags.pop("config")
    cfg = build_config(ScoreConfig, config, **flags)
    from vpotool.stages.score import run_score

    typer.echo(f"wrote {run_score(cfg)}")
