"""OpenSora-VAE-v1.2, written for vpotool: a per-frame image VAE (diffusers ``AutoencoderKL``, the SDXL/PixArt-Sigma
VAE) followed by a causal temporal VAE that compresses 4 frames into 1, with the published latent normalisation.

Parameter names follow ``hpcai-tech/OpenSora-VAE-v1.2`` (``spatial_vae.module.*``, ``temporal_vae.*``, ``scale``,
``shift``), taken from hpcaitech/Open-Sora tag v1.2.0 (commit 17cce908b22283acc3c946816c81f46dd442a453):
``opensora/models/vae/vae.py`` (``VideoAutoencoderPipeline``, ``OpenSoraVAE_V1_2``) and
``opensora/models/vae/vae_temporal.py`` (``VAE_Temporal_SD``). Encoding returns the posterior mean (upstream samples).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vpotool.models.opensora.checkpoint import config_from_dict, load_exact, read_config, save_folder

SD_SCALE = 0.18215  # Open-Sora multiplies the image VAE latents by SD's factor, whatever the VAE's config says

# The SDXL VAE's architecture, as PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers ships it in vae/config.json.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
)


@dataclass
class OpenSoraVAEConfig:
    """Defaults are the published OpenSora-VAE-v1.2."""

    spatial: dict = field(default_factory=lambda: dict(SDXL_VAE))  # AutoencoderKL(**spatial)
    channels: int = 4  # image-VAE latent channels = temporal VAE in/out and latent channels
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    micro_frame_size: int = 17  # pixel frames the temporal VAE sees at once
    micro_batch_size: int = 4  # frames the image VAE sees at once
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` pixel frames: each chunk of ``micro_frame_size`` is front-padded to a
        multiple of ``time_factor`` (17 -> 5, 51 -> 15)."""
        full, rest = divmod(frames, self.micro_frame_size)
        per_chunk = -(-self.micro_frame_size // self.time_factor)
        return full * per_chunk + -(-rest // self.time_factor)

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames ``decode`` returns for ``latent_frames``: full chunks of ``micro_frame_size``, and the fewest frames
        that give the remaining latents (``4 r - 3``), so 1 latent frame decodes to an image."""
        per_chunk = -(-self.micro_frame_size // self.time_factor)
        full, rest = divmod(latent_frames, per_chunk)
        return full * self.micro_frame_size + (max(self.time_factor * (rest - 1) + 1, 0) if rest else 0)


class CausalConv3d(nn.Module):
    """3D conv padded on the past side in time (and symmetrically in space); the conv lives at ``.conv``."""

    def __init__(self, cin, cout, kernel=3, stride=(1, 1, 1), bias=True):
        super().__init__()
        k = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.pad = (k[2] // 2, k[2] // 2, k[1] // 2, k[1] // 2, k[0] - stride[0], 0)
        self.conv = nn.Conv3d(cin, cout, k, stride=stride, bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


class TemporalEncoder(nn.Module):
    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        f0, n = c.filters, c.num_res_blocks
        self.conv_in = CausalConv3d(c.channels, f0, 3, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        prev = f0
        for i, mult in enumerate(c.channel_multipliers):
            f = f0 * mult
            self.block_res_blocks.append(
                nn.ModuleList(ResBlock(prev if j == 0 else f, f, c.num_groups) for j in range(n))
            )
            prev = f
            if i < len(c.channel_multipliers) - 1:
                down = c.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(f, f, 3, stride=(2, 1, 1)) if down else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, c.num_groups) for _ in range(n))
        self.norm1 = nn.GroupNorm(c.num_groups, prev)
        self.conv2 = CausalConv3d(prev, 2 * c.channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        f0, n, mults = c.filters, c.num_res_blocks, c.channel_multipliers
        self.temporal_downsample = tuple(bool(t) for t in c.temporal_downsample)
        top = f0 * mults[-1]
        self.conv1 = CausalConv3d(c.channels, top, 3)
        self.res_blocks = nn.ModuleList(ResBlock(top, top, c.num_groups) for _ in range(n))
        blocks, convs, prev = [], [], top
        for i in reversed(range(len(mults))):
            f = f0 * mults[i]
            blocks.insert(0, nn.ModuleList(ResBlock(prev if j == 0 else f, f, c.num_groups) for j in range(n)))
            prev = f
            if i > 0:
                up = self.temporal_downsample[i - 1]
                convs.insert(0, CausalConv3d(f, f * 2, 3) if up else nn.Identity())
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(blocks), nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(c.num_groups, prev)
        self.conv_out = CausalConv3d(prev, c.channels, 3)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_downsample[i - 1]:  # channels (C, 2) -> time (T, 2)
                    B, C2, T, H, W = x.shape
                    x = x.view(B, C2 // 2, 2, T, H, W).transpose(2, 3).reshape(B, C2 // 2, T * 2, H, W)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """``VAE_Temporal_SD``: ``[B, 4, T, h, w]`` image latents <-> ``[B, 4, T / 4, h, w]``."""

    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        self.factor = c.time_factor
        self.encoder = TemporalEncoder(c)
        self.quant_conv = CausalConv3d(2 * c.channels, 2 * c.channels, 1)
        self.post_quant_conv = CausalConv3d(c.channels, c.channels, 1)
        self.decoder = TemporalDecoder(c)

    def encode(self, x):
        """Posterior mean and log-variance (clamped to [-30, 20] as upstream), each ``[B, 4, ceil(T/4), h, w]``."""
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % self.factor, 0))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, num_frames: int):
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, -num_frames % self.factor :]


class SpatialVAE(nn.Module):
    """Holds the ``AutoencoderKL`` at ``.module`` (the checkpoint's ``spatial_vae.module.*``); per-frame."""

    def __init__(self, spatial: dict, micro_batch_size: int):
        super().__init__()
        from diffusers import AutoencoderKL

        self.module = AutoencoderKL(**spatial)
        self.micro_batch_size = micro_batch_size

    def _frames(self, fn, x):
        B = x.shape[0]
        flat = x.transpose(1, 2).flatten(0, 1)  # [B*T, C, H, W]
        out = torch.cat([fn(flat[i : i + self.micro_batch_size]) for i in range(0, len(flat), self.micro_batch_size)])
        return out.unflatten(0, (B, -1)).transpose(1, 2)

    def encode(self, x):
        return self._frames(lambda f: self.module.encode(f).latent_dist.mode() * SD_SCALE, x)

    def decode(self, z):
        return self._frames(lambda f: self.module.decode(f / SD_SCALE).sample, z)


class OpenSoraVAE(nn.Module):
    """``VideoAutoencoderPipeline``: ``encode([B, 3, T, H, W] in [-1, 1]) -> [B, 4, F, H/8, W/8]`` normalised latents
    (``(z - shift) / scale``) and ``decode`` back, both differentiable, in chunks of ``micro_frame_size`` frames."""

    def __init__(self, config: OpenSoraVAEConfig | None = None):
        super().__init__()
        self.cfg = c = config or OpenSoraVAEConfig()
        self.spatial_vae = SpatialVAE(c.spatial, c.micro_batch_size)
        self.temporal_vae = TemporalVAE(c)
        self.register_buffer("scale", torch.tensor(c.scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(c.shift, dtype=torch.float32)[None, :, None, None, None])

    @property
    def z_chunk(self) -> int:
        return self.cfg.latent_frames(self.cfg.micro_frame_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.spatial_vae.encode(x)
        m = self.cfg.micro_frame_size
        z = torch.cat([self.temporal_vae.encode(xz[:, :, i : i + m])[0] for i in range(0, xz.shape[2], m)], dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """``num_frames`` defaults to ``cfg.pixel_frames(F)``."""
        num_frames = self.cfg.pixel_frames(z.shape[2]) if num_frames is None else num_frames
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        parts, left = [], num_frames
        for i in range(0, z.shape[2], self.z_chunk):
            parts.append(self.temporal_vae.decode(z[:, :, i : i + self.z_chunk], min(self.cfg.micro_frame_size, left)))
            left -= self.cfg.micro_frame_size
        return self.spatial_vae.decode(torch.cat(parts, dim=2))

    def save_pretrained(self, folder) -> None:
        save_folder(self, self.cfg, "OpenSoraVAE", folder)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> OpenSoraVAE:
        """A vpotool-saved folder, or ``hpcai-tech/OpenSora-VAE-v1.2``'s (its transformers-style config.json has
        ``vae_2d``; the published architecture is used then). Raises ``FileNotFoundError`` or ``KeyError``."""
        from safetensors.torch import load_file

        from vpotool.models.loading import cast_like_loading, weightless

        weights = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(weights) and not weightless():
            raise FileNotFoundError(f"no model.safetensors in {folder}")
        config = OpenSoraVAEConfig()
        d = read_config(os.path.join(folder, "config.json"))
        if d is not None and "vae_2d" not in d:
            config = config_from_dict(OpenSoraVAEConfig, d)
        elif d is not None:  # a hub config keeps the published architecture but may set micro sizes
            config.micro_frame_size = d.get("micro_frame_size") or config.micro_frame_size
        with torch.device("meta"):
            model = cls(config)
        if weightless():  # `vpotool plan`: the architecture alone, on the meta device
            return cast_like_loading(model, dtype).eval()
        return load_exact(model, load_file(weights), weights, "the Open-Sora VAE").to(dtype).eval()
