"""The built-in ``tiny-ar`` model: the tiny world's autoregressive model, a SkyReels-V2 Diffusion Forcing folder.

The ``tiny`` model's VAE, text encoder and tokenizer, and a ``SkyReelsV2Transformer3DModel`` (the tiny Wan
transformer's architecture with a timestep per latent frame) started from the tiny transformer's weights and
teacher-forced on long clips of the world (``python -m vpotool.world.pretrain_ar``).

The tiny VAE knows 17-frame clips only: run over a longer video its causal cache drifts, and its reconstruction
error grows tenfold after frame 17 (measured: MSE 0.003 within the first 17 frames, 0.18 by frame 65). So
``tiny-ar`` cuts a video into 17-frame segments that share their boundary frame (frames 0-16, 16-32, ...), each
encoded and decoded alone (:class:`SegmentCodec`), and rolls out one segment (5 latent frames) per chunk beside the
segment before it: videos of 16k + 1 frames, any k.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Chunking, SamplingDefaults

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-ar"
TINY_AR_DEFAULTS = SamplingDefaults(frames=17, height=32, width=32, fps=8, steps=20, guidance=4.0)
SEGMENT_FRAMES = 17  # the tiny VAE's clip length; 5 latent frames


class SegmentCodec:
    """A video codec over segments of ``SEGMENT_FRAMES`` frames sharing their boundary frame, each coded alone by
    ``inner`` (a :class:`~vpotool.models.wan.WanVaeCodec`): ``T = 16k + 1`` frames <-> ``5k`` latent frames."""

    def __init__(self, inner):
        self.inner = inner
        self.vae = inner.vae
        self.latent_channels = inner.latent_channels
        self.temporal_factor = inner.temporal_factor
        self.spatial_factor = inner.spatial_factor
        self.segment_latents = (SEGMENT_FRAMES - 1) // inner.temporal_factor + 1

    def latent_frames(self, frames: int) -> int:
        step = SEGMENT_FRAMES - 1
        if frames < SEGMENT_FRAMES or (frames - 1) % step:
            raise VpoError(
                f"--frames {frames}: tiny-ar makes videos of 16k + 1 frames (17, 33, 49, 65, ...), one 17-frame "
                "segment per chunk"
            )
        return (frames - 1) // step * self.segment_latents

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames of ``latent_frames`` (whole segments) decoded: 16k + 1."""
        return latent_frames // self.segment_latents * (SEGMENT_FRAMES - 1) + 1

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        n = self.latent_frames(frames.shape[1]) // self.segment_latents
        step = SEGMENT_FRAMES - 1
        # one segment at a time: the codec's memory is one segment's, whatever the video's length
        return torch.cat([self.inner.encode(frames[:, k * step : k * step + SEGMENT_FRAMES]) for k in range(n)], 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        parts = [self.inner.decode(z) for z in latents.split(self.segment_latents, 2)]
        return torch.cat([parts[0]] + [p[:, 1:] for p in parts[1:]], 1)


def tiny_ar_chunking(addnoise: float = 0.0) -> Chunking:
    """One segment first, then one segment per chunk beside the segment before it."""
    return Chunking(first=5, chunk=5, context=5, context_noise=float(addnoise) / 1000.0)


def load_tiny_ar(
    path: str | None = None, device="cpu", dtype=torch.float32, addnoise: float = 0.0, ar_step: int = 0,
    causal_block_size: int = 0,
):  # fmt: skip
    """The tiny autoregressive model from ``path`` (a SkyReels-V2 DF folder), else the shipped weights;
    ``ar_step`` and ``causal_block_size`` as ``--model skyreels`` takes them (a chunk is 5 latent frames: blocks of
    1 or 5)."""
    from vpotool.models.skyreels import load_skyreels

    folder = path or str(ASSET_DIR)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        where = "the built-in weights are missing from this install" if path is None else f"{folder} has none"
        raise VpoError(f"no tiny-ar model_index.json: {where}; run python -m vpotool.world.pretrain_ar --out DIR")
    if not 0 <= float(addnoise) < 1000:
        raise VpoError(f"--model-options addnoise={addnoise}: a timestep in [0, 1000)")
    return load_skyreels(
        folder, device, dtype, name="tiny-ar", defaults=TINY_AR_DEFAULTS, chunking=tiny_ar_chunking(addnoise),
        codec_wrap=SegmentCodec, ar_step=ar_step, causal_block_size=causal_block_size,
    )  # fmt: skip
