"""Tiny random checkpoints of the diffusers video families, saved in the diffusers layout for offline tests."""

from __future__ import annotations

from pathlib import Path

import torch

# (frames, height, width) of the smallest video each tiny family samples and decodes.
FAMILY_SIZES = {"wan": (9, 16, 16), "cogvideox": (9, 16, 16), "ltx": (9, 16, 16), "skyreels": (17, 16, 16)}
TEXT_DIM = 32
TEXT_LEN = 16


def _text_encoder(cls_name: str, vocab_size: int):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("EncoderModel", "Config"))
    config = config_cls(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return getattr(transformers, cls_name)(config).eval()


def _wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return transformer, vae, "UMT5EncoderModel", scheduler


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from vpotool.models.cogvideox import COGVIDEOX_SCHEDULER

    # Rotary positions (as in CogVideoX-5b) so the backend's image_rotary_emb path runs; the head dim must
    # split into the 1/4 temporal and 3/8 + 3/8 spatial rotary parts.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # snr_shift_scale 1.0 (CogVideoX-5b) differs from the backend's fallback, so tests can tell it was read.
    scheduler = CogVideoXDDIMScheduler(**{**COGVIDEOX_SCHEDULER, "snr_shift_scale": 1.0})
    return transformer, vae, "T5EncoderModel", scheduler


def _ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    from vpotool.models.ltx import LTX_SCHEDULER

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    # timestep_conditioning on (as in LTX-Video 0.9.1+) so decode's timestep path runs.
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=True,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER)
    return transformer, vae, "T5EncoderModel", scheduler


def _skyreels():
    """SkyReels-V2 Diffusion Forcing: the tiny Wan parts with its per-frame-timestep transformer. The fps embedding
    stays off, as in the published DF checkpoints (diffusers 0.42 fails on it in diffusion-forcing mode)."""
    from diffusers import SkyReelsV2Transformer3DModel

    wan, vae, text_cls, scheduler = _wan()
    config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
    return SkyReelsV2Transformer3DModel(**config), vae, text_cls, scheduler


BUILDERS = {"wan": _wan, "cogvideox": _cogvideox, "ltx": _ltx, "skyreels": _skyreels}
PIPELINES = {
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
    "ltx": "LTXPipeline",
    "skyreels": "SkyReelsV2DiffusionForcingPipeline",
}


def make_tiny_checkpoint(family: str, folder: str | Path, seed: int = 0) -> str:
    """Build ``family``'s tiny random components under ``seed`` and save them to ``folder`` in the diffusers layout
    (transformer/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json). Returns the folder path."""
    from vpotool.models.tiny import build_tokenizer

    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(BUILDERS)}")
    folder = Path(folder)
    tokenizer = build_tokenizer(max_len=TEXT_LEN)
    torch.manual_seed(seed)
    transformer, vae, text_cls, scheduler = BUILDERS[family]()
    text_encoder = _text_encoder(text_cls, len(tokenizer))
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family])(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )
    pipe.save_pretrained(folder)  # model_index.json too, so ``DiffusionPipeline.from_pretrained`` loads it
    return str(folder)


def make_tiny_wan22(folder: str | Path, boundary_ratio: float = 0.9, seed: int = 0) -> str:
    """A tiny two-expert Wan 2.2 (A14B layout): the tiny Wan checkpoint plus a second, differently initialised
    transformer as ``transformer_2`` (the low-noise expert) and ``boundary_ratio`` in ``model_index.json``."""
    from diffusers import WanPipeline, WanTransformer3DModel

    folder = Path(make_tiny_checkpoint("wan", folder, seed=seed))
    pipe = WanPipeline.from_pretrained(folder)
    torch.manual_seed(seed + 1)
    low = WanTransformer3DModel.from_config(pipe.transformer.config)
    pipe = WanPipeline(**pipe.components | {"transformer_2": low}, boundary_ratio=boundary_ratio)
    pipe.save_pretrained(folder)
    return str(folder)


def prefix_chunks_equal(backend, short: int, long: int, height: int, width: int, steps: int = 2) -> int:
    """Sample the same two seeds at ``short`` and ``long`` pixel frames through ``vpotool sample``'s generator, greedy
    and stochastic, and assert that the longer videos' first latent frames equal the shorter ones' (the same seed
    extends its video); returns how many latent frames were compared."""
    from vpotool.stages.sample import generate

    prompts, seeds = ["a red circle moving left", "a blue square moving up"], [3, 4]
    cond = backend.encode_prompts(prompts)
    n = backend.latent_shape(short, height, width)[1]
    assert backend.latent_shape(long, height, width)[1] > n
    for noise_level in (0.0, 0.7):
        runs = []
        for frames in (short, long):
            settings = dict(frames=frames, height=height, width=width, steps=steps, guidance=1.0,
                            noise_level=noise_level)  # fmt: skip
            runs.append(generate(backend, prompts, seeds, settings, cond=cond)[0])
        torch.testing.assert_close(runs[1][:, :, :n], runs[0], atol=1e-6, rtol=0)
    return n
