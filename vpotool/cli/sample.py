"""`vpotool sample`: K candidate videos per prompt from a model (and optional adapter)."""

from __future__ import annotations

import typer

from vpotool.config import SampleConfig, build_config, doc


def _o(name: str, *flags: str):
    return typer.Option(None, *flags, help=doc(SampleConfig, name))


def command(
    prompts: str = _o("prompts", "--prompts"),
    out: str = _o("out", "--out"),
    model: str = _o("model", "--model"),
    model_path: str = _o("model_path", "--model-path"),
    adapter: str = _o("adapter", "--adapter"),
    candidates: int = _o("candidates", "--candidates", "-k"),
    frames: int = _o("frames", "--frames"),
    height: int = _o("height", "--height"),
    width: int = _o("width", "--width"),
    fps: int = _o("fps", "--fps"),
    steps: int = _o("steps", "--steps"),
    guidance: float = _o("guidance", "--guidance"),
    noise_level: float = _o("noise_level", "--noise-level"),
    seed: int = _o("seed", "--seed"),
    batch_size: int = _o("batch_size", "--batch-size"),
    device: str = _o("device", "--device"),
    dtype: str = _o("dtype", "--dtype"),
    shard: str = _o("shard", "--shard"),
    crf: int = _o("crf", "--crf"),
    config: str = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Sample K candidate videos per prompt -> OUT/samples.parquet, OUT/videos/*.mp4, OUT/latents/."""
    flags = dict(locals())
    flags.pop("config")
    cfg = build_config(SampleConfig, config, **flags)
    from vpotool.stages.sample import run_sample

    path = run_sample(cfg)
    typer.echo(f"wrote {path}")
