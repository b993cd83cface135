"""The built-in ``tiny`` model: a small Wan 2.1-style text-to-video model of the tiny world, on a laptop CPU.

A trained Wan VAE (4x spatial, 4x temporal compression to 16 channels), a Wan transformer and a word-level UMT5
text encoder, shipped in ``vpotool/assets/tiny`` as a complete diffusers ``WanPipeline`` folder: vpotool loads it
through the same Wan code path as any Wan checkpoint, and ``WanPipeline.from_pretrained`` loads it too.
``python -m vpotool.world.pretrain`` trains it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vpotool.errors import VpoError
from vpotool.models.base import ModelInfo, SamplingDefaults
from vpotool.models.wan import WanBackend, WanVaeCodec, load_wan

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TINY_DEFAULTS = SamplingDefaults(frames=17, height=32, width=32, fps=8, steps=20, guidance=4.0)

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

# The shipped folder is a complete diffusers Wan pipeline; these configs build it (see vpotool.world.pretrain).
TINY_TEXT_LEN = 16
TINY_SHIFT = 2.0
TINY_VAE = dict(
    base_dim=12,
    z_dim=16,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    scale_factor_spatial=4,
    scale_factor_temporal=4,
)
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
TINY_TEXT_ENCODER = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0)


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


def build_tiny_pipeline(seed: int = 0):
    """A randomly initialised tiny ``WanPipeline`` (transformer, Wan VAE, UMT5 text encoder, word tokenizer and a
    flow-matching Euler scheduler) under a fixed seed."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer(TINY_TEXT_LEN)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLWan(**TINY_VAE)
    te_cfg = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **TINY_TEXT_ENCODER)
    return WanPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=UMT5EncoderModel(te_cfg).eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT),
    )


def load_tiny(path: str | None = None, device="cpu", dtype=torch.float32) -> WanBackend:
    """The tiny model from ``path`` (a Wan pipeline folder), else the shipped weights, else seed-0 random weights."""
    folder = path or (str(ASSET_DIR) if (ASSET_DIR / "model_index.json").exists() else None)
    if folder is None:
        pipe = build_tiny_pipeline(seed=0)
        return tiny_backend(pipe, "builtin:seed0", device, dtype)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise VpoError(
            f"{folder} is not a tiny model folder (no model_index.json); omit --model-path to use the built-in"
        )
    return load_wan(folder, device, dtype, name="tiny", defaults=TINY_DEFAULTS)


def tiny_backend(pipe, source: str, device="cpu", dtype=torch.float32) -> WanBackend:
    """Wrap a tiny ``WanPipeline`` held in memory (e.g. from ``build_tiny_pipeline``) as a backend."""
    parts = [m.to(device) for m in (pipe.transformer, pipe.vae, pipe.text_encoder)]
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) would
        parts = [m.to(dtype) for m in parts]
    transformer, vae, text_encoder = (m.eval() for m in parts)
    return WanBackend(
        info=ModelInfo(name="tiny", path=source),
        transformer=transformer,
        codec=WanVaeCodec(vae),
        text_encoder=text_encoder,
        tokenizer=pipe.tokenizer,
        shift=TINY_SHIFT,
        euler_scheduler=pipe.scheduler,
        defaults=TINY_DEFAULTS,
        max_text_len=TINY_TEXT_LEN,
        device=device,
        dtype=dtype,
    )
