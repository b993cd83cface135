"""STDiT3, Open-Sora 1.2's spatial-temporal diffusion transformer, written for vpotool.

Parameter names follow the published checkpoint ``hpcai-tech/OpenSora-STDiT-v3`` so its safetensors load as they are.
They were taken from the upstream modelling code, hpcaitech/Open-Sora tag v1.2.0 (commit
17cce908b22283acc3c946816c81f46dd442a453): ``opensora/models/stdit/stdit3.py`` (``STDiT3``, ``STDiT3Block``,
``STDiT3Config``) and the layers it uses in ``opensora/models/layers/blocks.py``. The maths is reimplemented here:
sin-cos 2D positions scaled by resolution, interleaved rotary embedding on temporal attention (as
``rotary_embedding_torch`` 0.5.3 computes it, whose ``freqs`` lands in the checkpoint as ``rope.freqs``), RMS
qk-norm, adaLN-single modulation with ``scale_shift_table``. Frame-conditioning (``x_mask``) and sequence
parallelism are left out.

The model follows Open-Sora's sign: it predicts ``x0 - noise`` at timestep ``t = 1000 * sigma`` where
``x_t = (1 - sigma) * x0 + sigma * noise``. The backend turns that into vpotool's velocity.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vpotool.models.opensora.checkpoint import config_from_dict, load_exact, read_config, save_folder

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass
class STDiT3Config:
    """STDiT3 hyper-parameters; the defaults are the published STDiT3-XL/2 (``hpcai-tech/OpenSora-STDiT-v3``)."""

    in_channels: int = 4  # latent channels of the Open-Sora VAE
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patch of the 3D patch embedding
    hidden_size: int = 1152
    depth: int = 28  # pairs of (spatial, temporal) blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-XXL hidden size
    model_max_length: int = 300  # text tokens; also the length of the learned null caption
    qk_norm: bool = True  # RMSNorm on queries and keys of self-attention
    pred_sigma: bool = True  # output 2 * in_channels; only the first half (the velocity) is used
    input_sq_size: int = 512  # sqrt(H * W) in pixels at which positions are unscaled
    class_dropout_prob: float = 0.1  # caption dropout used in training (recorded, not applied here)

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by num_heads and by 4")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` (cos first, then sin) of ``t [N]`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int, device=None) -> torch.Tensor:
    """Sin-cos positions ``[1, h * w, dim]`` float32 for a row-major ``h x w`` patch grid.

    Grid coordinates are ``arange(n) / scale * base_size / n``; the first half of the channels encodes the
    column (width) coordinate and the second half the row, each as ``[sin, cos]``.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    gh = torch.arange(h, device=device) / scale
    gw = torch.arange(w, device=device) / scale
    gh, gw = gh * (base_size / h), gw * (base_size / w)
    cols = gw[None, :].expand(h, w).reshape(-1)
    rows = gh[:, None].expand(h, w).reshape(-1)

    def sincos(p):
        out = p[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    return torch.cat([sincos(cols), sincos(rows)], dim=-1).unsqueeze(0)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in float32 (Llama/T5 style)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding with interleaved pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., T, D]`` by position along its second-to-last dim."""
        pos = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)
        angles = (pos.float()[:, None] * self.freqs.float()[None]).repeat_interleave(2, dim=-1)  # [T, D]
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` with timm's parameter names."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, rope: Rotary | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self._rope = [rope]  # shared with the model, kept out of this module's state dict

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = self._rope[0]
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask):
        """``x [B, N, C]`` attends to ``y [B, L, C]``; ``mask [B, L]`` marks real (non-padding) tokens."""
        B, N, C = x.shape
        d = C // self.heads
        q = self.q_linear(x).view(B, N, self.heads, d).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if mask is None else mask.bool()[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class STDiT3Block(nn.Module):
    """One spatial (attention within a frame) or temporal (attention across frames at one position) block."""

    def __init__(self, cfg: STDiT3Config, temporal: bool, rope: Rotary | None):
        super().__init__()
        dim = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, rope if temporal else None)
        self.cross_attn = CrossAttention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t_mlp, mask, T: int, S: int):
        """``x [B, T*S, C]`` (frame-major), ``y [B, L, C]``, ``t_mlp [B, 6*C]``, ``mask [B, L]``."""
        B, N, C = x.shape
        mods = (self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # sequences over frames, one per spatial position
            h = h.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            h = self.attn(h).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        else:  # sequences over positions, one per frame
            h = self.attn(h.reshape(B * T, S, C)).view(B, N, C)
        x = x + gate_msa * h
        x = x + self.cross_attn(x, y, mask)
        h = self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * h


class FinalLayer(nn.Module):
    """PixArt's ``T2IFinalLayer``: modulated LayerNorm then a linear map to patch pixels."""

    def __init__(self, dim: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar (timestep or fps) through a 2-layer SiLU MLP (``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 states to the hidden size; ``y_embedding`` is the learned null caption used for guidance."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.y_proj = Mlp(cfg.caption_channels, cfg.hidden_size, cfg.hidden_size)
        null = torch.randn(cfg.model_max_length, cfg.caption_channels) / cfg.caption_channels**0.5
        self.register_buffer("y_embedding", null)

    def forward(self, y):
        return self.y_proj(y)


class STDiT3(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Open-Sora 1.2's denoiser. ``forward(x [B, C, T, h, w], timestep [B], y [B, L, caption_channels],
    mask [B, L], fps [B], height, width) -> [B, out_channels, T, h, w]`` float32, Open-Sora's sign."""

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    def __init__(self, config: STDiT3Config | None = None):
        super().__init__()
        cfg = config or STDiT3Config()
        self.cfg = cfg
        self.register_to_config(**asdict(cfg))
        self.gradient_checkpointing = False
        dim = cfg.hidden_size
        self.rope = Rotary(dim // cfg.num_heads)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.fps_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(cfg)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(cfg, False, None) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(cfg, True, self.rope) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, math.prod(cfg.patch_size), cfg.out_channels)

    def null_caption(self, n: int) -> torch.Tensor:
        """The learned unconditional caption ``[n, model_max_length, caption_channels]``."""
        null = self.y_embedder.y_embedding
        return null[None].expand(n, *null.shape)

    def forward(self, x, timestep, y, mask=None, fps=None, height=None, width=None):
        """``height``/``width`` are the video's pixel size (they scale the positions; default ``8 * h``, ``8 * w``);
        ``fps`` defaults to 24. ``timestep`` is ``1000 * sigma``."""
        cfg = self.cfg
        dtype = self.x_embedder.proj.weight.dtype
        B, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = cfg.patch_size
        x = F.pad(x.to(dtype), (0, -Wx % pw, 0, -Hx % ph, 0, -Tx % pt))
        T, H, W = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        S = H * W
        height = float(height if height is not None else 8 * Hx)
        width = float(width if width is not None else 8 * Wx)
        pos = pos_embed_2d(
            cfg.hidden_size, H, W, math.sqrt(height * width) / cfg.input_sq_size, round(S**0.5), x.device
        )

        fps = torch.full((B,), 24.0, device=x.device) if fps is None else fps.to(x.device).float().expand(B)
        t = self.t_embedder(timestep.to(x.device).to(dtype).expand(B)) + self.fps_embedder(fps)
        t_mlp = self.t_block(t)
        y = self.y_embedder(y.to(dtype))

        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # [B, T*S, C], frame-major
        x = (x.view(B, T, S, -1) + pos.to(dtype)).view(B, T * S, -1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            for block in (spatial, temporal):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = self._gradient_checkpointing_func(block, x, y, t_mlp, mask, T, S)
                else:
                    x = block(x, y, t_mlp, mask, T, S)
        x = self.final_layer(x, t)  # [B, T*S, pt*ph*pw*C_out]
        c = cfg.out_channels
        x = x.view(B, T, H, W, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, c, T * pt, H * ph, W * pw)[:, :, :Tx, :Hx, :Wx]
        return x.float()

    def save_pretrained(self, folder, **_) -> None:
        """``folder/config.json`` + ``folder/model.safetensors``, the layout ``from_pretrained`` and the hub use."""
        save_folder(self, self.cfg, "STDiT3", folder, WEIGHT_FILES[0])

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, **_) -> STDiT3:
        """Load a folder (``config.json`` + ``model.safetensors`` or ``diffusion_pytorch_model.safetensors``,
        as vpotool or ``hpcai-tech/OpenSora-STDiT-v3`` lay it out) or a single ``.safetensors`` file (published
        defaults). Raises ``FileNotFoundError`` or ``KeyError`` (missing/unexpected weights)."""
        from safetensors.torch import load_file

        from vpotool.models.loading import cast_like_loading, weightless

        path = str(path)
        if weightless() and os.path.isdir(path):  # `vpotool plan`: the architecture alone, on the meta device
            d = read_config(os.path.join(path, "config.json"))
            with torch.device("meta"):
                model = cls(STDiT3Config() if d is None else config_from_dict(STDiT3Config, d))
            return cast_like_loading(model, dtype).eval()
        if os.path.isdir(path):
            weights = next(
                (os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None
            )
            if weights is None:
                raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {path}")
            cfg_path = os.path.join(path, "config.json")
        elif os.path.isfile(path):
            weights, cfg_path = path, os.path.join(os.path.dirname(path), "config.json")
        else:
            raise FileNotFoundError(f"no STDiT3 checkpoint at {path}")
        d = read_config(cfg_path)
        config = STDiT3Config() if d is None else config_from_dict(STDiT3Config, d)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(weights)
        state.setdefault("rope.freqs", Rotary(config.hidden_size // config.num_heads).freqs)
        state = {k: v.to(dtype) for k, v in state.items()}  # cast here: ModelMixin.to(dtype) warns
        return load_exact(model, state, weights, f"STDiT3 {config}").eval()
