"""`vpotool merge`: combine shard manifests of one kind into one file."""

from __future__ import annotations

import typer


def command(
    inputs: list[str] = typer.Argument(..., help="Manifests to combine (e.g. RUN/samples-*.parquet)."),
    out: str = typer.Option(..., "--out", help="Output manifest path."),
):
    """Combine manifests of one kind (shards of sample or score) into one, rewriting relative paths."""
    from vpotool.manifest import merge_manifests

    kind, n = merge_manifests(inputs, out)
    typer.echo(f"wrote {out} ({n} {kind} rows)")
