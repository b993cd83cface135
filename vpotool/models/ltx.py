"""LTX-Video text-to-video backend (diffusers): flow-matching transformer on packed tokens, T5 text encoder, LTX VAE.

LTX shifts its flow schedule by the latent's token count: ``schedule`` and ``training_timesteps`` take the latent
shape they serve.
"""

from __future__ import annotations

import math

import torch

from vpotool.models.base import (
    Conditioning,
    ModelInfo,
    NoiseSchedule,
    SamplingDefaults,
    TextVideoBackend,
    flow_points,
    shifted,
    text_length,
    tokenize,
    uniform_sigmas,
    uses_text_encoder,
    vae_input,
    vae_output,
)

LTX_DEFAULTS = SamplingDefaults(frames=161, height=512, width=704, fps=25, steps=50, guidance=3.0)
# LTX-Video's published scheduler config: used when a checkpoint has no readable scheduler/ folder.
LTX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)


def calculate_shift(
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """``mu`` for a latent of ``seq_len`` tokens: linear through ``(base_seq_len, base_shift)`` and
    ``(max_seq_len, max_shift)``, extrapolated beyond them."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential time shift ``sigma' = e^mu / (e^mu + (1 / sigma - 1))`` for ``sigmas`` in (0, 1]."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Scale ``1 - sigma`` so the last sigma becomes ``terminal`` (the scheduler's ``shift_terminal``)."""
    one_minus = 1 - sigmas
    if one_minus[-1] <= 0:  # a one-step grid [1]: nothing to stretch
        return sigmas
    return 1 - one_minus * (1 - terminal) / one_minus[-1]


def ltx_sigmas(steps: int, mu: float | None, shift: float = 1.0, shift_terminal: float | None = None) -> torch.Tensor:
    """The sampling sigmas ``[steps + 1]`` (float64), noisiest first and ending at 0, as LTX's pipeline sets them:
    ``linspace(1, 1 / steps, steps)``, time-shifted by ``mu`` (or the static ``shift`` when ``mu`` is None),
    stretched to ``shift_terminal``, then the clean point."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = time_shift(s, mu) if mu is not None else shifted(s, shift)
    if shift_terminal:
        s = stretch_to_terminal(s, shift_terminal)
    return torch.cat([s, s.new_zeros(1)])


def pack_latents(latents: torch.Tensor, patch_size: int = 1, patch_size_t: int = 1) -> torch.Tensor:
    """``[B, C, F, H, W] -> [B, (F / pt) (H / p) (W / p), C pt p p]`` tokens, in LTX's order."""
    b, c, f, h, w = latents.shape
    p, pt = patch_size, patch_size_t
    x = latents.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * pt * p * p)


def unpack_latents(
    tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int = 1, patch_size_t: int = 1
) -> torch.Tensor:
    """The inverse of ``pack_latents``; ``frames, height, width`` count patches. Returns ``[B, C, F, H, W]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, frames, height, width, -1, patch_size_t, patch_size, patch_size)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, x.shape[1], frames * patch_size_t, height * patch_size, width * patch_size)


class LtxVaeCodec:
    """``AutoencoderKLLTXVideo`` with LTX's latent normalisation ``(z - mean) * scaling_factor / std``.

    ``decode_timestep`` feeds VAEs with ``timestep_conditioning``; at its default 0 the latents are decoded as
    they are (the pipeline's default path). A positive value also blends in noise at ``decode_noise_scale``.
    """

    def __init__(self, vae, decode_timestep: float = 0.0, decode_noise_scale: float | None = None):
        self.vae = vae
        self.latent_channels = vae.config.latent_channels
        self.temporal_factor = vae.temporal_compression_ratio
        self.spatial_factor = vae.spatial_compression_ratio
        self.scaling_factor = vae.config.scaling_factor
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(vae_input(frames, self.vae.dtype)).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) * self.scaling_factor / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        z = latents * std / self.scaling_factor + mean
        temb = None
        if self.vae.config.timestep_conditioning:
            temb = torch.full((z.shape[0],), float(self.decode_timestep), device=z.device, dtype=z.dtype)
            if self.decode_noise_scale > 0:
                z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * torch.randn_like(z)
        return vae_output(self.vae.decode(z.to(self.vae.dtype), temb, return_dict=False)[0])


class LtxBackend(TextVideoBackend):
    """An LTX-Video transformer behind the backend protocol (``x_t = (1 - sigma) x0 + sigma noise``, model
    timestep ``sigma * 1000``).

    ``schedule`` and ``training_timesteps`` shift for the token count ``F * h * w`` of the latent ``shape`` they are
    given (the published default size when None). ``frame_rate`` sets the rotary position scale.
    """

    prediction = "flow"

    def __init__(
        self,
        *,
        transformer,
        scheduler_config: dict,
        defaults: SamplingDefaults = LTX_DEFAULTS,
        max_text_len: int = 128,
        **parts,
    ):
        """``parts``: the other :class:`TextVideoBackend` arguments (``codec`` an :class:`LtxVaeCodec`)."""
        patch = transformer.config.patch_size
        super().__init__(
            transformer=transformer, defaults=defaults, max_text_len=max_text_len, patch_size=patch, **parts
        )
        self.scheduler_config = {**LTX_SCHEDULER, **scheduler_config}
        self.frame_rate = float(defaults.fps)
        self.default_shape = self.latent_shape(defaults.frames, defaults.height, defaults.width)

    @uses_text_encoder
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``{"encoder_hidden_states": [B, L, text_dim], "encoder_attention_mask": [B, L]}`` (mask 1 on tokens)."""
        ids, mask = tokenize(self.tokenizer, prompts, self.max_text_len, self.device)
        hidden = self.text_encoder(ids)[0]  # unmasked, as LTX's pipeline encodes
        mask = mask.to(self.dtype)
        return {"encoder_hidden_states": hidden.to(self.dtype), "encoder_attention_mask": mask}

    def mu(self, shape: tuple[int, ...] | None = None) -> float | None:
        """The dynamic shift for latents of ``shape``; None when the scheduler uses its static ``shift``."""
        cfg = self.scheduler_config
        if not cfg["use_dynamic_shifting"]:
            return None
        _, f, h, w = shape or self.default_shape
        return calculate_shift(
            f * h * w, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        cfg = self.scheduler_config
        return flow_points(ltx_sigmas(steps, self.mu(shape), cfg["shift"], cfg["shift_terminal"]), clean_point=True)

    def training_timesteps(
        self, n: int, generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None
    ) -> NoiseSchedule:
        """Sigma uniform in (0, 1), shifted like the sampling grid (the terminal stretch belongs to the grid only)."""
        u = uniform_sigmas(n, generator)
        mu = self.mu(shape)
        sigmas = time_shift(u, mu) if mu is not None else shifted(u, self.scheduler_config["shift"])
        return flow_points(sigmas, clean_point=False)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow velocity ``[B, C, F, h, w]`` for ``x_t [B, C, F, h, w]`` at ``timesteps [B]`` (sigma * 1000)."""
        cfg = self.model.config
        _, _, f, h, w = x_t.shape
        p, p_t = cfg.patch_size, cfg.patch_size_t
        c = self.codec
        out = self.denoiser(
            hidden_states=pack_latents(x_t.to(self.dtype), p, p_t),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps.to(self.device),
            encoder_attention_mask=cond["encoder_attention_mask"],
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=(c.temporal_factor / self.frame_rate, c.spatial_factor, c.spatial_factor),
            return_dict=False,
        )[0]
        return unpack_latents(out, f // p_t, h // p, w // p, p, p_t)


def load_scheduler_config(path: str) -> dict:
    """The checkpoint's ``scheduler/scheduler_config.json`` as a dict; LTX-Video's published one when missing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        cfg = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler").config
    except (OSError, ValueError):
        return dict(LTX_SCHEDULER)
    return {k: cfg[k] for k in LTX_SCHEDULER}  # the class fills keys the file leaves out


def load_ltx(path: str, device="cpu", dtype=torch.float32) -> LtxBackend:
    """An LTX-Video text-to-video checkpoint in diffusers layout (local folder or hub id)."""
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
    from transformers import T5EncoderModel

    from vpotool.models.loading import load_parts

    parts = load_parts(path, "ltx", LTXVideoTransformer3DModel, AutoencoderKLLTXVideo, T5EncoderModel, device, dtype)
    transformer, vae, text_encoder, tokenizer = parts
    return LtxBackend(
        info=ModelInfo(name="ltx", path=str(path)),
        transformer=transformer,
        codec=LtxVaeCodec(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=load_scheduler_config(path),
        max_text_len=text_length(tokenizer, 128),
        device=device,
        dtype=dtype,
    )
