"""Model registry: a plain dict from ``--model`` name to a loader ``(path, device, dtype, **options) -> Backend``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Backend


def _tiny(path, device, dtype):
    from vpotool.models.tiny import load_tiny

    return load_tiny(path, device, dtype)


def _wan(path, device, dtype):
    from vpotool.models.wan import load_wan

    return load_wan(path, device, dtype)


def _cogvideox(path, device, dtype):
    from vpotool.models.cogvideox import load_cogvideox

    return load_cogvideox(path, device, dtype)


def _ltx(path, device, dtype):
    from vpotool.models.ltx import load_ltx

    return load_ltx(path, device, dtype)


def _opensora(path, device, dtype, **options):
    from vpotool.models.opensora import load_opensora

    return load_opensora(path, device, dtype, **options)


def _skyreels(path, device, dtype, **options):
    from vpotool.models.skyreels import load_skyreels

    return load_skyreels(path, device, dtype, **options)


def _tiny_ar(path, device, dtype, **options):
    from vpotool.models.tiny_ar import load_tiny_ar

    return load_tiny_ar(path, device, dtype, **options)


def _self_forcing(path, device, dtype, **options):
    from vpotool.models.self_forcing import load_self_forcing

    return load_self_forcing(path, device, dtype, **options)


MODELS: dict[str, Callable[..., Backend]] = {
    "tiny": _tiny,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "ltx": _ltx,
    "opensora": _opensora,
    "skyreels": _skyreels,
    "tiny-ar": _tiny_ar,
    "self-forcing": _self_forcing,
}

# ``--model-options`` each family takes, with their defaults (the reference implementation's). The VAE options apply
# to the diffusers VAEs (``enable_tiling``/``enable_slicing``) after loading; the others go to the family's loader.
VAE_OPTIONS = {"vae_tiling": False, "vae_slicing": False}
MODEL_OPTIONS: dict[str, dict] = {
    "tiny": VAE_OPTIONS,
    "wan": VAE_OPTIONS,
    "cogvideox": VAE_OPTIONS,
    "ltx": VAE_OPTIONS,
    "opensora": {"aesthetic_score": 6.5, "clean_prompts": True},
    # autoregressive families: the rollout's window, context and context noise (vpotool.models.skyreels)
    # ar_step > 0: SkyReels-V2's asynchronous mode; causal_block_size 0: the checkpoint's (vpotool.diffusion_forcing)
    "skyreels": {
        **VAE_OPTIONS,
        "base_frames": 97,
        "overlap_frames": 17,
        "addnoise": 0.0,
        "ar_step": 0,
        "causal_block_size": 0,
    },
    "tiny-ar": {**VAE_OPTIONS, "addnoise": 0.0, "ar_step": 0, "causal_block_size": 0},
    # checkpoint=PATH.pt (the generator), the rest Self-Forcing's config (vpotool.models.self_forcing)
    "self-forcing": {
        **VAE_OPTIONS,
        "checkpoint": "",
        "ema": True,
        "context_noise": 0.0,
        "context_mode": "inference",  # or training (vpotool.models.self_forcing.self_forcing_chunking)
        "denoising_steps": (1000, 750, 500, 250),  # a list: denoising_steps=1000,600,300
        "warp": True,
        "shift": 5.0,
    },
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """``--dtype`` value to a torch dtype."""
    if name not in DTYPES:
        raise VpoError(f"unknown --dtype '{name}'; choose from: float32, bfloat16, float16")
    return DTYPES[name]


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise VpoError(f"unknown model '{name}'; choose from: {', '.join(sorted(MODELS))}")


def model_options(name: str, text: str | dict | None) -> dict:
    """``--model-options`` for ``--model name``, parsed and checked against the options the family takes."""
    from vpotool.options import parse_pairs, typed_value

    options = text if isinstance(text, dict) else parse_pairs(text, "--model-options", "aesthetic_score=6.5")
    known = MODEL_OPTIONS.get(name, {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        raise VpoError(f"--model-options: --model {name} has no option {', '.join(unknown)}; {takes}")
    return {k: typed_value("--model-options", k, v, known[k]) for k, v in options.items()}


def load_backend(
    name: str,
    path: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    options: str | dict | None = None,
) -> Backend:
    """Load the backend registered under ``name``, weights from ``path`` (a local folder or hub id), with the
    family's ``options`` (``--model-options`` text or a dict)."""
    check_model_name(name)
    options = dict(model_options(name, options))
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    # Small gradients and attention weights turn denormal during training, and x86 CPUs compute on denormals
    # about ten times slower (measured on the tiny model's VAE); flushing them to zero changes no result that
    # matters. Process-wide, and a no-op on GPUs.
    torch.set_flush_denormal(True)
    vae = {k: options.pop(k) for k in list(options) if k in VAE_OPTIONS}
    backend = MODELS[name](path, device, dtype, **options)
    for option, on in vae.items():
        if on:  # vae_tiling -> enable_tiling(), vae_slicing -> enable_slicing()
            getattr(backend.codec.vae, "enable_" + option.removeprefix("vae_"))()
    for module in (getattr(backend, "text_encoder", None), getattr(getattr(backend, "codec", None), "vae", None)):
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # frozen: ReFL backpropagates through the VAE to the adapter only
    return backend


def resolve_device(name: str) -> str:
    """``--device auto`` -> cuda when available, else cpu; a CUDA device asked for without CUDA is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VpoError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name
