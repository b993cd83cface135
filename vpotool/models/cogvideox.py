"""CogVideoX text-to-video backend (diffusers): v-prediction DDIM transformer, T5 text encoder, CogVideoX VAE."""

from __future__ import annotations

import torch

from vpotool.errors import VpoError
from vpotool.models.base import (
    Conditioning,
    ModelInfo,
    NoiseSchedule,
    SamplingDefaults,
    TextVideoBackend,
    tokenize,
    uses_text_encoder,
    vae_input,
    vae_output,
)

COGVIDEOX_DEFAULTS = SamplingDefaults(frames=49, height=480, width=720, fps=8, steps=50, guidance=6.0)
# CogVideoX-2b's published scheduler config: used when a checkpoint has no readable scheduler/ folder.
COGVIDEOX_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    snr_shift_scale=3.0,
)
PREDICTION_TYPES = {"v_prediction": "v", "epsilon": "epsilon"}


class CogVideoXVaeCodec:
    """``AutoencoderKLCogVideoX`` with latents multiplied by the config's ``scaling_factor``.

    ``encode([B, T, 3, H, W] in [0, 1]) -> [B, C, (T - 1) // 4 + 1, H / 8, W / 8]`` (factors read from the config).
    """

    def __init__(self, vae):
        cfg = vae.config
        self.vae = vae
        self.latent_channels = cfg.latent_channels
        self.temporal_factor = cfg.temporal_compression_ratio
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = cfg.scaling_factor

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(vae_input(frames, self.vae.dtype)).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scaling_factor).to(self.vae.dtype)
        return vae_output(self.vae.decode(z, return_dict=False)[0])


class CogVideoXBackend(TextVideoBackend):
    """A CogVideoX transformer behind the backend protocol; the forward process is the scheduler's
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at integer timesteps ``t`` in ``[0, num_train_timesteps)``.

    Prompts are T5-encoded at the transformer's ``max_text_seq_length`` (226 for released models), padded to that
    length without an attention mask, as CogVideoX's pipeline does.
    """

    prediction = "v"

    def __init__(self, *, transformer, scheduler, defaults: SamplingDefaults = COGVIDEOX_DEFAULTS, **parts):
        """``parts``: the other :class:`TextVideoBackend` arguments (``codec`` a :class:`CogVideoXVaeCodec`)."""
        cfg = transformer.config
        super().__init__(
            transformer=transformer,
            defaults=defaults,
            max_text_len=cfg.max_text_seq_length,
            patch_size=cfg.patch_size,
            **parts,
        )
        self.scheduler = scheduler
        kind = scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise VpoError(f"unsupported CogVideoX scheduler prediction_type '{kind}'; expected v_prediction")
        self.prediction = PREDICTION_TYPES[kind]
        self.alphas_cumprod = scheduler.alphas_cumprod.double().cpu()  # [num_train_timesteps]
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self._rotary_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @uses_text_encoder
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``{"encoder_hidden_states": [B, max_text_len, text_dim]}``."""
        ids, _ = tokenize(self.tokenizer, prompts, self.max_text_len, self.device)
        hidden = self.text_encoder(ids)[0]  # unmasked, as CogVideoX's pipeline encodes
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def _grid(self, timesteps: torch.Tensor, with_clean_point: bool) -> NoiseSchedule:
        abar = self.alphas_cumprod[timesteps.long()]
        if with_clean_point:
            abar = torch.cat([abar, abar.new_tensor([self.final_alpha_cumprod])])
        return NoiseSchedule(
            timesteps=timesteps.float(), alphas=abar.sqrt().float(), sigmas=(1 - abar).clamp_min(0).sqrt().float()
        )

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        """The scheduler's own timesteps for ``steps`` (e.g. 999, 979, ..., 19 for 50 trailing steps), then the
        clean point ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``)."""
        try:
            self.scheduler.set_timesteps(steps)
        except ValueError as e:
            raise VpoError(f"--steps {steps} does not fit the CogVideoX scheduler: {e}") from e
        return self._grid(self.scheduler.timesteps.cpu(), with_clean_point=True)

    def training_timesteps(
        self, n: int, generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None
    ) -> NoiseSchedule:
        t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)
        return self._grid(t, with_clean_point=False)

    def _rotary(self, frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_rotary_emb`` for ``frames x h x w`` latents, positioned as CogVideoX's pipeline does."""
        key = (frames, h, w)
        if key not in self._rotary_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            cfg = self.model.config
            p, p_t = cfg.patch_size, cfg.patch_size_t
            grid = (h // p, w // p)
            base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
            if p_t is None:  # CogVideoX 1.0: the grid is fitted into the training grid, centred
                crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
                emb = get_3d_rotary_pos_embed(
                    cfg.attention_head_dim, crops, grid, temporal_size=frames, device=self.device
                )
            else:  # CogVideoX 1.5: positions sliced from the largest grid
                emb = get_3d_rotary_pos_embed(
                    cfg.attention_head_dim,
                    None,
                    grid,
                    temporal_size=(frames + p_t - 1) // p_t,
                    grid_type="slice",
                    max_size=(base_h, base_w),
                    device=self.device,
                )
            self._rotary_cache[key] = emb
        return self._rotary_cache[key]

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v-prediction ``[B, C, F, h, w]`` for ``x_t [B, C, F, h, w]`` at integer-valued ``timesteps [B]``.

        CogVideoX 1.5 (``patch_size_t`` set) needs a frame count divisible by ``patch_size_t``; its pipeline
        samples extra leading noise frames and drops them. Here the first latent frame is repeated in front
        instead and its output dropped, so latents keep the natural ``(T - 1) // 4 + 1`` frames for training too.
        """
        cfg = self.model.config
        b, _, f, h, w = x_t.shape
        x = x_t.to(self.dtype).permute(0, 2, 1, 3, 4)  # CogVideoX takes [B, F, C, h, w]
        pad = (-f) % cfg.patch_size_t if cfg.patch_size_t else 0
        if pad:
            x = torch.cat([x[:, :1].expand(-1, pad, -1, -1, -1), x], dim=1)
        extra = {}
        if cfg.use_rotary_positional_embeddings:
            extra["image_rotary_emb"] = self._rotary(f + pad, h, w)
        if cfg.ofs_embed_dim:
            extra["ofs"] = x.new_full((b,), 2.0)  # the value CogVideoX's image-to-video pipeline passes
        out = self.denoiser(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps.to(self.device),
            return_dict=False,
            **extra,
        )[0]
        return out[:, pad:].permute(0, 2, 1, 3, 4)


def load_scheduler(path: str):
    """The checkpoint's ``CogVideoXDDIMScheduler``, or CogVideoX-2b's config when ``scheduler/`` is missing."""
    from diffusers import CogVideoXDDIMScheduler

    try:
        return CogVideoXDDIMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError):
        return CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)


def load_cogvideox(path: str, device="cpu", dtype=torch.float32) -> CogVideoXBackend:
    """A CogVideoX text-to-video checkpoint in diffusers layout (local folder or hub id)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    from vpotool.models.loading import load_parts

    parts = load_parts(
        path, "cogvideox", CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, T5EncoderModel, device, dtype
    )
    transformer, vae, text_encoder, tokenizer = parts
    return CogVideoXBackend(
        info=ModelInfo(name="cogvideox", path=str(path)),
        transformer=transformer,
        codec=CogVideoXVaeCodec(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=load_scheduler(path),
        device=device,
        dtype=dtype,
    )
