"""The built-in ``tiny`` model: a small Wan-style flow transformer in pixel space, with a word-level text encoder.

It runs on a laptop CPU in seconds. Weights ship in ``vpotool/assets/tiny`` when present; otherwise the model is
initialised from a fixed seed, so it is still deterministic. The folder has the diffusers layout
(``transformer/``, ``text_encoder/``, ``tokenizer/``) plus ``tiny.json`` for the pixel codec, and loads through
the same ``from_pretrained`` path as any other checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vpotool.errors import VpoError
from vpotool.models.base import ModelInfo, SamplingDefaults
from vpotool.models.wan import WanBackend

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TINY_DEFAULTS = SamplingDefaults(frames=16, height=32, width=32, fps=8, steps=20, guidance=4.0)

# Words of the tiny world's prompt grammar; anything else maps to [UNK].
VOCAB_WORDS = tuple(
    (
        "a an the on in of and with at to is moving moves static still slowly quickly slow fast small large big "
        "left right up down upward downward across bouncing spinning growing shrinking "
        "red green blue yellow cyan magenta white black gray grey orange purple pink brown "
        "circle square triangle ring cross diamond dot disk box shape ball background"
    ).split()
)
SPECIALS = ["[PAD]", "</s>", "[UNK]"]

TINY_CONFIG = {
    "pixel_factor": 4,
    "shift": 1.0,
    "max_text_len": 16,
    "sigma_data": 0.75,  # RMS of the world's clips in codec space (0.76 measured); see TinyBackend
    "coord_channels": 3,  # (x, y, t) in [-1, 1] appended to the denoiser's input; see TinyBackend
    "transformer": dict(
        patch_size=(1, 1, 1),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=48 + 3,
        out_channels=48,
        text_dim=32,
        freq_dim=64,
        ffn_dim=128,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ),
    "text_encoder": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0),
}


class PixelCodec:
    """A fixed, invertible pixel transform in place of a VAE: ``[0, 1] -> [-1, 1]``, then ``factor x factor``
    pixel-unshuffle per frame. ``[B, T, 3, H, W] -> [B, 3 f^2, T, H / f, W / f]``."""

    temporal_factor = 1

    def __init__(self, factor: int = 4):
        self.spatial_factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        z = F.pixel_unshuffle(frames.flatten(0, 1) * 2 - 1, self.spatial_factor)
        return z.unflatten(0, (b, t)).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, t = latents.shape[:3]
        x = F.pixel_shuffle(latents.transpose(1, 2).flatten(0, 1).float(), self.spatial_factor)
        return ((x + 1) / 2).clamp(0, 1).unflatten(0, (b, t))


class TinyBackend(WanBackend):
    """The Wan backend with EDM-style preconditioning (Karras et al. 2022) of the velocity, for a small denoiser
    ``F``: ``v = c_skip x_t + c_out F(c_in x_t)``, with the coefficients of the best linear velocity estimate for
    data of RMS ``sigma_data``. ``x_t = (1 - s) x0 + s n`` and ``v = n - x0``, so with ``D = (1 - s)^2 d^2 + s^2``:
    ``c_in = 1 / sqrt(D)``, ``c_skip = (s - (1 - s) d^2) / D``, ``c_out = d / sqrt(D)``. The network only learns
    the unit-variance residual instead of copying the noise through itself, which a small pixel-space transformer
    learns slowly.

    With ``coord_channels`` 3 the denoiser also sees each position's (x, y, t) in [-1, 1] as extra input channels:
    Wan's rotary embedding is relative only, so without them the network cannot say *where* a shape is likely
    from pure noise, and must learn to break the symmetry itself. Outside ``predict`` it is an ordinary velocity
    model, so samplers and trainers are unchanged."""

    def __init__(self, *args, sigma_data: float, coord_channels: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_data = float(sigma_data)
        self.coord_channels = int(coord_channels)
        if self.coord_channels not in (0, 3):
            raise VpoError(f"tiny.json: coord_channels must be 0 or 3, not {coord_channels}")

    def with_coords(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, F, h, w]`` with the (x, y, t) coordinate channels appended (when the model has them)."""
        if not self.coord_channels:
            return x
        b, _, f, h, w = x.shape
        axes = [torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in (f, h, w)]
        t, y, xx = torch.meshgrid(*axes, indexing="ij")
        return torch.cat([x, torch.stack([xx, y, t]).expand(b, -1, -1, -1, -1)], dim=1)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        s = (timesteps.to(self.device, torch.float32) / 1000.0).view(-1, *([1] * (x_t.dim() - 1)))
        d2 = self.sigma_data**2
        denom = (1 - s) ** 2 * d2 + s**2
        c_in, c_skip, c_out = denom.rsqrt(), (s - (1 - s) * d2) / denom, self.sigma_data * denom.rsqrt()
        raw = super().predict(self.with_coords((c_in * x_t.float()).to(self.dtype)), timesteps, cond)
        return (c_skip * x_t.float() + c_out * raw.float()).to(raw.dtype)


def build_tokenizer(max_len: int = 16):
    """A word-level tokenizer over the tiny world's vocabulary, ending each prompt with ``</s>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(VOCAB_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]", model_max_length=max_len
    )


def build_tiny_components(seed: int = 0, config: dict = TINY_CONFIG):
    """Randomly initialised tiny transformer, text encoder and tokenizer under a fixed seed."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer(config["max_text_len"])
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**config["transformer"])
    te_cfg = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **config["text_encoder"])
    text_encoder = UMT5EncoderModel(te_cfg)
    return transformer, text_encoder, tokenizer


def save_tiny(folder: str | Path, transformer, text_encoder, tokenizer, config: dict = TINY_CONFIG) -> None:
    """Write a tiny model folder that ``load_tiny(folder)`` reads back."""
    folder = Path(folder)
    transformer.save_pretrained(folder / "transformer")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    meta = {k: v for k, v in config.items() if k not in ("transformer", "text_encoder")}
    (folder / "tiny.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_tiny(path: str | None = None, device="cpu", dtype=torch.float32) -> WanBackend:
    """The tiny model from ``path`` (a folder written by ``save_tiny``), else the shipped weights, else seed 0."""
    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from vpotool.models.loading import load_component

    folder = path or (str(ASSET_DIR) if (ASSET_DIR / "tiny.json").exists() else None)
    if folder:
        if not os.path.exists(os.path.join(folder, "tiny.json")):
            raise VpoError(
                f"{folder} is not a tiny model folder (no tiny.json); omit --model-path to use the built-in"
            )
        meta = json.loads(Path(folder, "tiny.json").read_text())
        transformer = load_component(WanTransformer3DModel, folder, "transformer", "tiny", dtype=dtype)
        text_encoder = load_component(UMT5EncoderModel, folder, "text_encoder", "tiny", dtype=dtype)
        tokenizer = load_component(AutoTokenizer, folder, "tokenizer", "tiny")
        source = folder
    else:
        meta = TINY_CONFIG
        transformer, text_encoder, tokenizer = build_tiny_components(seed=0)
        if dtype != torch.float32:
            transformer, text_encoder = transformer.to(dtype=dtype), text_encoder.to(dtype=dtype)
        source = "builtin:seed0"
    return tiny_backend(transformer, text_encoder, tokenizer, meta, source, device, dtype)


def tiny_backend(transformer, text_encoder, tokenizer, meta: dict, source: str, device="cpu", dtype=torch.float32):
    """Wrap tiny components (from ``load_tiny`` or fresh from ``build_tiny_components``) as a backend. Folders
    without ``sigma_data`` in ``tiny.json`` (written before preconditioning) predict the velocity directly."""
    if meta.get("sigma_data"):
        cls, extra = TinyBackend, {"sigma_data": meta["sigma_data"], "coord_channels": meta.get("coord_channels", 0)}
    else:
        cls, extra = WanBackend, {}
    return cls(
        info=ModelInfo(name="tiny", path=source),
        transformer=transformer.to(device).eval(),
        codec=PixelCodec(meta["pixel_factor"]),
        text_encoder=text_encoder.to(device),
        tokenizer=tokenizer,
        shift=float(meta["shift"]),
        defaults=TINY_DEFAULTS,
        max_text_len=int(meta["max_text_len"]),
        device=device,
        dtype=dtype,
        **extra,
    )
