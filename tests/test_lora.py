"""LoRA adapters: saved by vpotool, loaded by vpotool and by diffusers' pipelines at the same strength."""

from __future__ import annotations

import torch
from families import make_tiny_checkpoint

from vpotool.models import load_backend
from vpotool.training.lora import add_lora, load_adapter, save_adapter


def _denoise(transformer, gen_seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)[0]


def test_adapter_with_alpha_unlike_rank_loads_at_its_trained_strength(tmp_path):
    """An adapter trained with alpha 16 and rank 4 (scale 4) gives the trained model's output through
    ``load_adapter`` (what ``sample --adapter``, ``eval`` and ``loop`` use) and through diffusers'
    ``WanPipeline.load_lora_weights``; read as alpha = rank it would act at a quarter of its strength."""
    from diffusers import WanPipeline

    folder = make_tiny_checkpoint("wan", tmp_path / "wan")
    trained = load_backend("wan", folder)
    params = add_lora(trained.denoiser, rank=4, alpha=16, targets=trained.lora_target_modules)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # a "trained" adapter: B no longer zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(trained.denoiser, tmp_path / "adapter", {"base_model": "wan"})
    expected = _denoise(trained.denoiser)

    base = _denoise(load_backend("wan", folder).denoiser)
    loaded = load_backend("wan", folder)
    load_adapter(loaded, tmp_path / "adapter")
    pipe = WanPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(tmp_path / "adapter"))

    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_denoise(loaded.denoiser), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_denoise(pipe.transformer), expected, atol=1e-6, rtol=1e-5)
    scaling = {m.scaling["default"] for m in loaded.denoiser.modules() if hasattr(m, "scaling") and m.scaling}
    assert scaling == {4.0}
