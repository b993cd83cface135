"""Model registry: a plain dict from ``--model`` name to a loader ``(path, device, dtype) -> Backend``."""

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


def _opensora(path, device, dtype):
    from vpotool.models.opensora import load_opensora

    return load_opensora(path, device, dtype)


MODELS: dict[str, Callable[..., Backend]] = {
    "tiny": _tiny,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "ltx": _ltx,
    "opensora": _opensora,
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


def load_backend(
    name: str, path: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Backend:
    """Load the backend registered under ``name``, weights from ``path`` (a local folder or hub id)."""
    check_model_name(name)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    # Small gradients and attention weights turn denormal during training, and x86 CPUs compute on denormals
    # about ten times slower (measured on the tiny model's VAE); flushing them to zero changes no result that
    # matters. Process-wide, and a no-op on GPUs.
    torch.set_flush_denormal(True)
    backend = MODELS[name](path, device, dtype)
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
