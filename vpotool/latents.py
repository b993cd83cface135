"""Latent files: one sample's final latent (and, for offline policy gradients, its sampler trajectory) as
safetensors, written by ``sample`` and by trainers that encode videos, read by the trainers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save

from vpotool import __version__
from vpotool.errors import disk_space
from vpotool.manifest import crash_point, temp_path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], crash: bool = False):
    """Write CPU ``tensors`` and ``metadata`` to ``path`` as safetensors, atomically: under vpotool's temporary name
    in the same folder (``.NAME.PID.tmp``, which ``remove_stale_temps`` deletes after a kill), then a rename. The
    file gets the mode the umask allows, as a plain ``open`` gives it. Not ``safetensors.torch.save_file``: it
    writes through a ``.tmpXXXXXX`` file of its own (mode 0600, kept by the rename) that a kill leaves behind and
    nothing can tell from another program's. ``crash``: a crash point between the write and the rename."""
    data = save(tensors, metadata=metadata)
    tmp = temp_path(path)
    try:
        with disk_space(path), open(tmp, "wb") as f:
            f.write(data)
        if crash:
            crash_point()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_latent(path: Path, latent: torch.Tensor, metadata: dict, extra: dict | None = None) -> None:
    """One sample's final latent ``[C, F, h, w]`` as safetensors (key ``latents``), atomically, with metadata.

    ``extra`` adds tensors under their own keys (the sampler's ``states`` and ``logps``), stored as float32."""
    meta = {"vpotool.schema": "latent", "vpotool.version": __version__, **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in {"latents": latent, **(extra or {})}.items()}
    write_safetensors(Path(path), tensors, meta, crash=True)


def load_latents(paths: list[Path]) -> torch.Tensor:
    """Stack latent files -> ``[N, C, F, h, w]`` float32 on the CPU. Reads only the ``latents`` tensor, not a
    stored trajectory next to it (``sample --save-trajectory`` files are S + 1 times larger)."""
    from safetensors import safe_open

    out = []
    for p in paths:
        with safe_open(str(p), "pt") as f:
            out.append(f.get_tensor("latents").float())
    return torch.stack(out)
