"""SkyReels-V2 Diffusion Forcing (diffusers layout): a Wan-architecture transformer that takes a timestep per latent
frame, sampled autoregressively window by window, as ``SkyReelsV2DiffusionForcingPipeline`` makes long videos.

The pipeline's long-video mode denoises a first window of ``base_num_frames`` pixel frames, then windows that
start with the last ``overlap_history`` frames already made (clean, or noised by ``addnoise_condition``) and add
the rest. In vpotool's terms (:class:`vpotool.rollout.Chunking`, in latent frames): ``first`` = the base window,
``context`` = the overlap, ``chunk`` = base minus overlap, ``context_noise`` = ``addnoise_condition / 1000``.
The built-in ``tiny-ar`` model is a SkyReels-V2 DF folder and loads through :func:`load_skyreels`.
"""

from __future__ import annotations

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Chunking, Conditioning, SamplingDefaults
from vpotool.models.wan import WanBackend, WanVaeCodec, wan_parts

SKYREELS_DEFAULTS = SamplingDefaults(frames=257, height=544, width=960, fps=24, steps=30, guidance=6.0)
# The pipeline's documented long-video settings (pixel frames; addnoise_condition in timesteps).
SKYREELS_OPTIONS = {"base_frames": 97, "overlap_frames": 17, "addnoise": 0.0}


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
    return Chunking(first=base, chunk=base - overlap, context=overlap, context_noise=float(addnoise) / 1000.0)


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
    ``base_frames``, ``overlap_frames`` and ``addnoise`` (:data:`SKYREELS_OPTIONS`). ``chunking`` and ``codec_wrap``
    (a function of the loaded :class:`WanVaeCodec`) replace the pipeline's (the built-in ``tiny-ar`` does)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from transformers import UMT5EncoderModel

    from vpotool.models.loading import checkpoint_schedulers, load_parts

    opts = {**SKYREELS_OPTIONS, **options}
    parts = load_parts(path, name, SkyReelsV2Transformer3DModel, AutoencoderKLWan, UMT5EncoderModel, device, dtype)
    transformer, vae, text_encoder, tokenizer = parts
    codec = WanVaeCodec(vae)
    if chunking is None:
        frames = (opts["base_frames"], opts["overlap_frames"], opts["addnoise"])
        chunking = skyreels_chunking(*frames, codec.temporal_factor)
    codec = codec if codec_wrap is None else codec_wrap(codec)
    schedulers = checkpoint_schedulers(path)
    parts = wan_parts(
        path, name, transformer, codec, text_encoder, tokenizer, defaults, schedulers, 8.0, device, dtype
    )
    return SkyReelsBackend(chunking=chunking, **parts)
