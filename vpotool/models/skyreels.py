"""SkyReels-V2 Diffusion Forcing (diffusers layout): a Wan-architecture transformer that takes a timestep per latent
frame, sampled autoregressively window by window, as ``SkyReelsV2DiffusionForcingPipeline`` makes long videos.

The pipeline's long-video mode denoises a first window of ``base_num_frames`` pixel frames, then windows that
start with the last ``overlap_history`` frames already made (clean, or noised by ``addnoise_condition``) and add
the rest. In vpotool's terms (:class:`vpotool.rollout.Chunking`, in latent frames): ``first`` = the base window,
``context`` = the overlap, ``chunk`` = base minus overlap, ``context_noise`` = ``addnoise_condition / 1000``; a
video that ends part way through a chunk ends with a shorter window, as the pipeline's does. ``ar_step > 0`` is
the pipeline's asynchronous mode (:mod:`vpotool.diffusion_forcing`), ``causal_block_size`` its causal blocks.
The built-in ``tiny-ar`` model is a SkyReels-V2 DF folder and loads through :func:`load_skyreels`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Chunking, Conditioning, SamplingDefaults
from vpotool.models.wan import WanBackend, WanVaeCodec, wan_parts

SKYREELS_DEFAULTS = SamplingDefaults(frames=257, height=544, width=960, fps=24, steps=30, guidance=6.0)
# The pipeline's documented long-video settings (pixel frames; addnoise_condition in timesteps).
# ar_step 0 is the synchronous mode; causal_block_size 0 the checkpoint's (``num_frame_per_block``, 1 in the
# published DF checkpoints), as the pipeline's causal_block_size=None.
SKYREELS_OPTIONS = {"base_frames": 97, "overlap_frames": 17, "addnoise": 0.0, "ar_step": 0, "causal_block_size": 0}


def skyreels_chunking(base_frames: int, overlap_frames: int, addnoise: float, temporal_factor: int = 4) -> Chunking:
    """The :class:`Chunking` of the pipeline's long-video mode with ``base_num_frames``, ``overlap_history`` and
    ``addnoise_condition`` (pixel frames converted to latent frames as the pipeline does)."""
    for name, v in (("base_frames", base_frames), ("overlap_frames", overlap_frames)):
        if int(v) < 1 or (int(v) - 1) % temporal_factor:
            raise VpoError(f"--model-options {name}={v}: must be {temporal_factor}k + 1 pixel frames (17, 97, ...)")
    base = (int(base_frames) - 1) // temporal_factor + 1
    overlap = (int(overlap_frames) - 1) // temporal_factor + 1
    if overlap >= base:
        raise VpoError(
            f"--model-options overlap_frames={overlap_frames} must be shorter than base_frames={base_frames}"
        )
    if not 0 <= float(addnoise) < 1000:
        raise VpoError(f"--model-options addnoise={addnoise}: a timestep in [0, 1000) (the pipeline recommends 20)")
    return Chunking(
        first=base, chunk=base - overlap, context=overlap, context_noise=float(addnoise) / 1000.0, short_last=True
    )


def diffusion_forcing(chunking: Chunking, ar_step: int, causal_block_size: int, model: str) -> Chunking:
    """``chunking`` with the pipeline's ``ar_step`` and ``causal_block_size`` (resolved: 1 or more), refused in one
    line where its windows cannot take them: a block size that does not divide the windows' latent frames (the
    pipeline would drop context frames or leave frames undenoised), or an ``ar_step > 0`` whose chunks are one
    block (nothing to stagger)."""
    ar, size = int(ar_step), int(causal_block_size)
    if ar < 0:
        raise VpoError(f"--model-options ar_step={ar_step}: denoising steps a block lags the one before, 0 or more "
                       "(0: synchronous; the pipeline suggests 5 with causal_block_size=5)")  # fmt: skip
    first, chunk, context = chunking.first, chunking.chunk, chunking.context
    divides = math.gcd(first, chunk, context)
    window = f"--model {model} makes {first} latent frames first, then {chunk} beside {context}"
    if size < 1 or divides % size:
        raise VpoError(f"--model-options causal_block_size={causal_block_size} must divide every window's latent "
                       f"frames: {window}; use a divisor of {divides}")  # fmt: skip
    if ar and min(chunking.first, chunking.chunk) < 2 * size:
        raise VpoError(
            f"--model-options ar_step={ar_step} staggers a chunk's causal blocks, but {window}, one block of "
            f"causal_block_size={size} each: use a smaller divisor of {divides}, or ar_step=0"
        )
    return dataclasses.replace(chunking, ar_step=ar, causal_block=size)


class SkyReelsBackend(WanBackend):
    """A Wan backend whose denoiser takes a timestep per latent frame (``enable_diffusion_forcing``), with the
    :class:`Chunking` its rollouts use. ``predict`` accepts timesteps ``[B]`` (every frame alike) or ``[B, F]``."""

    def __init__(self, *, chunking: Chunking, **parts):
        super().__init__(**parts)
        self.chunking = chunking
        self.fps = self.defaults.fps

    def use_video(self, frames: int, fps: int) -> None:
        """The fps the pipeline's fps flag is read from (:func:`vpotool.sampling.use_settings`)."""
        self.fps = fps

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, f = x_t.shape[0], x_t.shape[2]
        t = timesteps.to(self.device)
        if t.ndim == 1:
            t = t[:, None].expand(b, f)
        fps = [0 if self.fps == 16 else 1] * b  # the pipeline's fps flag: 16 fps or not
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            enable_diffusion_forcing=True,
            fps=fps,
            return_dict=False,
        )[0]


def load_skyreels(
    path: str, device="cpu", dtype=torch.float32, name: str = "skyreels", defaults=SKYREELS_DEFAULTS,
    chunking: Chunking | None = None, codec_wrap=None, **options,
) -> SkyReelsBackend:  # fmt: skip
    """A SkyReels-V2 Diffusion Forcing checkpoint in diffusers layout (local folder or hub id); ``options`` are
    ``base_frames``, ``overlap_frames``, ``addnoise``, ``ar_step`` and ``causal_block_size``
    (:data:`SKYREELS_OPTIONS`). ``chunking`` and ``codec_wrap`` (a function of the loaded :class:`WanVaeCodec`)
    replace the pipeline's window and codec (the built-in ``tiny-ar`` does); the asynchronous options apply to
    either."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from transformers import UMT5EncoderModel

    from vpotool.models.loading import checkpoint_schedulers, load_parts

    opts = {**SKYREELS_OPTIONS, **options}
    own = chunking is None
    if own:  # checked before the weights load (Wan's VAE: 4 frames a latent frame), again beside the loaded VAE
        chunking = skyreels_chunking(opts["base_frames"], opts["overlap_frames"], opts["addnoise"])
    diffusion_forcing(chunking, opts["ar_step"], opts["causal_block_size"] or 1, name)
    parts = load_parts(path, name, SkyReelsV2Transformer3DModel, AutoencoderKLWan, UMT5EncoderModel, device, dtype)
    transformer, vae, text_encoder, tokenizer = parts
    codec = WanVaeCodec(vae)
    if own and codec.temporal_factor != 4:
        frames = (opts["base_frames"], opts["overlap_frames"], opts["addnoise"])
        chunking = skyreels_chunking(*frames, codec.temporal_factor)
    # causal_block_size 0: the checkpoint's, as the pipeline's None; above 1 the attention is block-causal
    size = opts["causal_block_size"] or transformer.config.num_frame_per_block
    chunking = diffusion_forcing(chunking, opts["ar_step"], size, name)
    if size != transformer.config.num_frame_per_block:
        transformer._set_ar_attention(size)  # as the pipeline does
    codec = codec if codec_wrap is None else codec_wrap(codec)
    schedulers = checkpoint_schedulers(path)
    parts = wan_parts(
        path, name, transformer, codec, text_encoder, tokenizer, defaults, schedulers, 8.0, device, dtype
    )
    return SkyReelsBackend(chunking=chunking, **parts)
