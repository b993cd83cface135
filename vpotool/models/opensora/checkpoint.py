"""Saving and loading the Open-Sora modules: ``config.json`` (a dataclass config) next to one safetensors file,
loaded onto the meta device and filled with exactly the checkpoint's tensors."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields

import torch
from torch import nn


def config_from_dict(cls, d: dict):
    """The dataclass ``cls`` from the known keys of ``d`` (a vpotool or hub ``config.json``); others are ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def read_config(path: str) -> dict | None:
    """The ``config.json`` at ``path`` as a dict, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_folder(module: nn.Module, config, class_name: str, folder, weights: str = "model.safetensors") -> None:
    """``folder/config.json`` (``config`` with ``_class_name``) and ``folder/weights`` with the module's tensors."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": class_name, **asdict(config)}, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(folder, weights), metadata={"format": "pt"})


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], weights: str, what: str) -> nn.Module:
    """``model`` (built on the meta device) holding ``state``'s tensors; ``KeyError`` naming ``weights`` and
    ``what`` when any parameter is missing or any tensor is unexpected."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        example = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KeyError(f"{weights} does not fit {what}: {len(missing) + len(unexpected)} keys ({example})")
    return model
