"""Wan 2.1/2.2 text-to-video backend (diffusers): flow-matching transformer, UMT5 text encoder, Wan VAE.

The same class serves the built-in ``tiny`` model, which swaps the VAE for a fixed pixel codec.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vpotool.models.base import (
    Conditioning,
    ModelInfo,
    NegativeCache,
    NoiseSchedule,
    SamplingDefaults,
    flow_schedule,
    flow_training_timesteps,
    tokenize,
    video_latent_shape,
)

WAN_DEFAULTS = SamplingDefaults(frames=33, height=480, width=832, fps=16, steps=30, guidance=5.0)
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class Codec(Protocol):
    """Pixels <-> latents. ``encode([B, T, 3, H, W] in [0, 1]) -> [B, C, F, h, w]``; ``decode`` the inverse."""

    latent_channels: int
    temporal_factor: int  # latent frames = (T - 1) // temporal_factor + 1
    spatial_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class WanVaeCodec:
    """``AutoencoderKLWan`` with the per-channel latent normalisation ``(z - mean) / std`` from its config."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.temporal_factor = getattr(cfg, "scale_factor_temporal", None) or 4
        self.spatial_factor = getattr(cfg, "scale_factor_spatial", None) or 8
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    def _stats(self, like):
        return self._mean.to(like.device, like.dtype), self._std.to(like.device, like.dtype)

    def encode(self, frames):
        video = (frames.permute(0, 2, 1, 3, 4) * 2 - 1).to(self.vae.dtype)  # [B, 3, T, H, W] in [-1, 1]
        z = self.vae.encode(video).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents):
        mean, std = self._stats(latents)
        video = self.vae.decode((latents * std + mean).to(self.vae.dtype), return_dict=False)[0]
        return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


class WanBackend:
    """A flow-matching video transformer taking ``[B, C, F, h, w]`` latents and T5-style token embeddings.

    ``text_encoder`` and ``tokenizer`` follow transformers' API; prompt embeddings are trimmed to each prompt's
    length and zero-padded to ``max_text_len``, as Wan's pipeline does.
    """

    prediction = "flow"

    def __init__(
        self,
        *,
        info: ModelInfo,
        transformer,
        codec: Codec,
        text_encoder,
        tokenizer,
        shift: float,
        defaults: SamplingDefaults,
        max_text_len: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.info = info
        self.denoiser = transformer
        self.codec = codec
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.shift = shift
        self.defaults = defaults
        self.max_text_len = max_text_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.lora_target_modules = list(WAN_LORA_TARGETS)
        self.size_multiple = codec.spatial_factor * transformer.config.patch_size[1]
        self._negative = NegativeCache(self.encode_prompts)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_text_len, self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero the padding, like Wan's trim-and-pad
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def encode_negative(self, n: int) -> Conditioning:
        return self._negative(n)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return video_latent_shape(self.codec, frames, height, width)

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        return flow_schedule(steps, self.shift)

    def training_timesteps(
        self, n: int, generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None
    ) -> NoiseSchedule:
        return flow_training_timesteps(n, self.shift, generator)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=timesteps.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(frames)


def load_wan(path: str, device="cpu", dtype=torch.float32) -> WanBackend:
    """A Wan text-to-video checkpoint in diffusers layout (local folder or hub id)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from vpotool.models.loading import load_parts, scheduler_shift

    parts = load_parts(path, "wan", WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, device, dtype)
    transformer, vae, text_encoder, tokenizer = parts
    return WanBackend(
        info=ModelInfo(name="wan", path=str(path)),
        transformer=transformer,
        codec=WanVaeCodec(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        shift=scheduler_shift(path, default=3.0),
        defaults=WAN_DEFAULTS,
        max_text_len=min(512, getattr(tokenizer, "model_max_length", 512) or 512),
        device=device,
        dtype=dtype,
    )
