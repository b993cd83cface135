"""Wan 2.1/2.2 text-to-video backend (diffusers): flow-matching transformer, UMT5 text encoder, Wan VAE. A Wan 2.2
A14B folder (``transformer_2`` and ``boundary_ratio`` in ``model_index.json``) loads both experts.

The built-in ``tiny`` model is a Wan pipeline folder and loads through :func:`load_wan`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vpotool.errors import VpoError
from vpotool.models.base import (
    Conditioning,
    ModelInfo,
    NoiseSchedule,
    SamplingDefaults,
    TextVideoBackend,
    flow_training_timesteps,
    text_length,
    tokenize,
    uses_text_encoder,
    vae_input,
    vae_output,
)

WAN_DEFAULTS = SamplingDefaults(frames=33, height=480, width=832, fps=16, steps=30, guidance=5.0)
WAN_SIZES = {"480p": (480, 832), "720p": (720, 1280)}  # Wan's own sizes (its generate.py), landscape


class Codec(Protocol):
    """Pixels <-> latents. ``encode([B, T, 3, H, W] in [0, 1]) -> [B, C, F, h, w]``; ``decode`` the inverse."""

    latent_channels: int
    temporal_factor: int  # latent frames = (T - 1) // temporal_factor + 1
    spatial_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class WanVaeCodec:
    """``AutoencoderKLWan`` with the per-channel latent normalisation ``(z - mean) / std`` from its config."""

    causal_decode = True  # the decoder runs latent frame by latent frame with a causal cache: a prefix decodes alone

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
        z = self.vae.encode(vae_input(frames, self.vae.dtype)).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents):
        mean, std = self._stats(latents)
        return vae_output(self.vae.decode((latents * std + mean).to(self.vae.dtype), return_dict=False)[0])


class WanBackend(TextVideoBackend):
    """A flow-matching video transformer taking ``[B, C, F, h, w]`` latents and T5-style token embeddings.

    ``text_encoder`` and ``tokenizer`` follow transformers' API; prompt embeddings are trimmed to each prompt's
    length and zero-padded to ``max_text_len``, as Wan's pipeline does.
    """

    prediction = "flow"

    def __init__(
        self, *, transformer, shift: float, max_text_len: int = 512, euler_scheduler=None, pipeline_scheduler=None,
        **parts,
    ):  # fmt: skip
        """``parts``: the other :class:`TextVideoBackend` arguments (``codec`` is a :class:`Codec`).
        ``euler_scheduler``: the checkpoint's ``FlowMatchEulerDiscreteScheduler``, whose sigma grid then replaces
        vpotool's ``linspace(1, 0)`` grid, so that sampling equals ``WanPipeline`` with that scheduler.
        ``pipeline_scheduler``: another scheduler of the checkpoint (Wan's UniPC), which ``--sampler pipeline``
        steps with, as ``WanPipeline`` does; vpotool's own steps stay on the flow grid."""
        patch = transformer.config.patch_size[1]
        super().__init__(transformer=transformer, max_text_len=max_text_len, patch_size=patch, **parts)
        self.shift = shift
        self.euler_scheduler = euler_scheduler
        self.pipeline_scheduler = pipeline_scheduler

    def size_preset(self, name: str) -> tuple[int, int]:
        """``--size`` for Wan: ``480p`` (480x832) or ``720p`` (720x1280), landscape; ``480p:9:16`` for portrait. Models
        that load through Wan's code with sizes of their own (``tiny``, SkyReels, Self-Forcing) have none."""
        if self.defaults is not WAN_DEFAULTS:
            raise VpoError(f"--size {name}: --model {self.info.name} has no size presets; pass --height and --width")
        resolution, _, ratio = name.partition(":")
        if resolution not in WAN_SIZES or ratio not in ("", "16:9", "9:16"):
            raise VpoError(f"--size {name}: Wan's sizes are {', '.join(WAN_SIZES)} (add :9:16 for portrait); or pass "
                           "--height and --width")  # fmt: skip
        height, width = WAN_SIZES[resolution]
        return (width, height) if ratio == "9:16" else (height, width)

    @uses_text_encoder
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        # the pipeline's own cleaning: ftfy when installed, HTML entities unescaped twice, whitespace collapsed
        ids, mask = tokenize(self.tokenizer, [prompt_clean(p) for p in prompts], self.max_text_len, self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero the padding, like Wan's trim-and-pad
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        if self.euler_scheduler is None:  # vpotool's grid (sigmas 1 .. 0), shifted in float32 as diffusers does
            return euler_grid(steps, self.shift)
        self.euler_scheduler.set_timesteps(steps)
        sigmas = self.euler_scheduler.sigmas.float().cpu()  # with the final 0
        return NoiseSchedule(timesteps=sigmas[:-1] * 1000.0, alphas=1.0 - sigmas, sigmas=sigmas)

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


def euler_grid(steps: int, shift: float) -> NoiseSchedule:
    """The first-order grid of ``--sampler euler`` on a checkpoint that saves no Euler scheduler: sigmas evenly from
    1 to 0, shifted by diffusers' ``FlowMatchEulerDiscreteScheduler`` itself. Its float32 arithmetic decides which
    expert of a Wan 2.2 folder takes a step that lands on the boundary (874.99994 < 875: the low-noise one), as
    the pipeline's schedulers decide it; the float64 shift would round to 875.0 and pick the other."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    sigmas = scheduler.sigmas.float().cpu()  # with the final 0
    return NoiseSchedule(timesteps=scheduler.timesteps.float().cpu(), alphas=1.0 - sigmas, sigmas=sigmas)


def expert_boundary(path: str, scheduler) -> float | None:
    """The timestep below which a two-expert Wan 2.2 checkpoint switches to ``transformer_2``:
    ``boundary_ratio * num_train_timesteps`` from ``model_index.json``, as ``WanPipeline`` computes it; None for a
    one-transformer checkpoint. A ``transformer_2`` without a ratio (or the reverse) is refused."""
    from vpotool.models.loading import pipeline_index

    index = pipeline_index(path)
    ratio = index.get("boundary_ratio")
    second = (index.get("transformer_2") or [None])[0] is not None
    if ratio is None and not second:
        return None
    if ratio is None or not second:
        have, missing = ("transformer_2", "boundary_ratio") if second else ("boundary_ratio", "transformer_2")
        raise VpoError(
            f"{path}/model_index.json names {have} but no {missing}; a two-expert Wan 2.2 folder needs both"
        )
    steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
    return float(ratio) * steps


def load_wan(path: str, device="cpu", dtype=torch.float32, name: str = "wan", defaults=WAN_DEFAULTS) -> WanBackend:
    """A Wan text-to-video checkpoint in diffusers layout (local folder or hub id); ``name`` and ``defaults`` let
    the built-in ``tiny`` model, itself a Wan pipeline folder, load through the same path."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from vpotool.models.experts import TimestepExperts
    from vpotool.models.loading import checkpoint_schedulers, load_component, load_parts

    parts = load_parts(path, name, WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, device, dtype)
    transformer, vae, text_encoder, tokenizer = parts
    euler, other = checkpoint_schedulers(path)
    boundary = expert_boundary(path, euler or other)
    if boundary is not None:  # Wan 2.2 A14B: a low-noise expert below the boundary timestep
        low = load_component(WanTransformer3DModel, path, "transformer_2", name, dtype=dtype).to(device).eval()
        transformer = TimestepExperts(transformer, low, boundary)
    return WanBackend(**wan_parts(path, name, transformer, WanVaeCodec(vae), text_encoder, tokenizer, defaults,
                                  (euler, other), 3.0, device, dtype))  # fmt: skip


def wan_parts(path, name, transformer, codec, text_encoder, tokenizer, defaults, schedulers, shift, device, dtype):
    """The :class:`WanBackend` arguments of a loaded Wan-layout checkpoint (Wan, SkyReels-V2): ``schedulers`` is
    :func:`~vpotool.models.loading.checkpoint_schedulers`' pair, ``shift`` the flow shift when they state none."""
    from vpotool.models.loading import scheduler_shift

    euler, other = schedulers
    return dict(
        info=ModelInfo(name=name, path=str(path)), transformer=transformer, codec=codec, text_encoder=text_encoder,
        tokenizer=tokenizer, shift=scheduler_shift(euler or other, default=shift), euler_scheduler=euler,
        pipeline_scheduler=other, defaults=defaults, max_text_len=text_length(tokenizer, 512), device=device,
        dtype=dtype,
    )  # fmt: skip
