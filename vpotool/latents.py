"""Latent files: one sample's final latent (and, for offline policy gradients, its sampler trajectory) as
safetensors, written by ``sample`` and by trainers that encode videos, read by the trainers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from vpotool import __version__
from vpotool.manifest import crash_point


def save_latent(path: Path, latent: torch.Tensor, metadata: dict, extra: dict | None = None) -> None:
    """One sample's final latent ``[C, F, h, w]`` as safetensors (key ``latents``), atomically, with metadata.

    ``extra`` adds tensors under their own keys (the sampler's ``states`` and ``logps``), stored as float32."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"vpotool.schema": "latent", "vpotool.version": __version__, **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in {"latents": latent, **(extra or {})}.items()}
    save_file(tensors, str(tmp), metadata=meta)
    crash_point()
    os.replace(tmp, path)


def load_latents(paths: list[Path]) -> torch.Tensor:
    """Stack latent files -> ``[N, C, F, h, w]`` float32 on the CPU. Reads only the ``latents`` tensor, not a
    stored trajectory next to it (``sample --save-trajectory`` files are S + 1 times larger)."""
    from safetensors import safe_open

    out = []
    for p in paths:
        with safe_open(str(p), "pt") as f:
            out.append(f.get_tensor("latents").float())
    return torch.stack(out)
