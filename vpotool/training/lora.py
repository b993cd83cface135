"""LoRA adapters on a backend's denoiser (peft through diffusers), saved in the format diffusers'
``load_lora_weights`` reads: ``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the
adapter config in the ``lora_adapter_metadata`` entry, plus vpotool's own metadata. A two-expert denoiser
(:class:`~vpotool.models.experts.TimestepExperts`) saves both experts' adapters in one file, under
``transformer.`` and ``transformer_2.``."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from vpotool import __version__
from vpotool.errors import VpoError, one_line
from vpotool.latents import write_safetensors
from vpotool.training import fsdp

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "transformer"  # the denoiser's name in every diffusers video pipeline


def add_lora(denoiser, rank: int, alpha: float, targets: list[str], name: str = "default", trainable: bool = True):
    """Freeze ``denoiser`` and add a LoRA adapter (B = 0, so it starts as the identity) in float32, whatever the
    denoiser's dtype. Returns its parameters."""
    from peft import LoraConfig

    if name == "default":
        denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    try:
        with warnings.catch_warnings():  # a second adapter (the DPO reference) is intended, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            denoiser.add_adapter(config, adapter_name=name)
    except ValueError as e:
        raise VpoError(f"cannot add LoRA on modules {targets}: {str(e).splitlines()[0]} (check --lora-targets)") from e
    params = adapter_parameters(denoiser, name)
    for p in params:
        # Adapters live in float32 whatever the frozen weights are: in bf16 an update of lr * 1 on a weight of
        # 1e-2 rounds away, so a bf16 adapter silently stops learning. peft casts each LoRA input to the
        # adapter's dtype and the sum back to the base layer's, so the forward mixes the two correctly.
        p.data = p.data.float()
        p.requires_grad_(trainable)
    if name == "default":
        denoiser.set_adapter("default")
    return params


def adapter_parameters(denoiser, name: str = "default") -> list[torch.nn.Parameter]:
    """The parameters of adapter ``name`` (after FSDP sharding: the sharded ones, which replaced them)."""
    return [p for n, p in denoiser.named_parameters() if f".{name}." in n and "lora_" in n]


def adapter_state(denoiser, name: str = "default", full_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as peft saves them (no adapter name), e.g. ``blocks.0.attn1.to_q.lora_A.weight``;
    taken from ``full_state`` (the gathered weights of an FSDP-sharded denoiser, keyed as its state dict) when
    given."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, state_dict=full_state, adapter_name=name)


def load_adapter_state(denoiser, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy ``state`` (as from :func:`adapter_state`; full tensors also into an FSDP-sharded denoiser) into adapter
    ``name``."""
    from peft.utils import set_peft_model_state_dict

    if fsdp.is_sharded(denoiser):
        unexpected = fsdp.load_adapter_shards(denoiser, state, name)
    else:
        unexpected = getattr(set_peft_model_state_dict(denoiser, state, adapter_name=name), "unexpected_keys", [])
    if unexpected:
        n = len(unexpected)
        raise VpoError(f"adapter weights do not fit this model ({n} unexpected keys, e.g. {unexpected[0]})")


@contextmanager
def reference_mode(denoiser, mode: str):
    """Run the denoiser as a frozen policy: ``"base"`` disables the adapter; any other mode activates the frozen
    adapter of that name (``"ref"``: DPO's reference, ``"old"``: DiffusionNFT's sampling policy)."""
    if mode == "base":
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()
    else:
        denoiser.set_adapter(mode)
        try:
            yield
        finally:
            denoiser.set_adapter("default")


def copy_adapter(denoiser, src: str = "default", dst: str = "ref") -> None:
    """Make adapter ``dst`` a copy of ``src`` (the curriculum reference update)."""
    with torch.no_grad():
        load_adapter_state(denoiser, {k: v.detach().clone() for k, v in adapter_state(denoiser, src).items()}, dst)


def save_adapter(denoiser, folder: str | Path, meta: dict, name: str = "default", full_state=None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically; ``meta`` lands as ``vpotool.*`` metadata.
    ``full_state``: see :func:`adapter_state`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(denoiser, name, full_state)
    # One component (prefix "transformer."), or two experts whose keys already carry their component names.
    components = list(getattr(denoiser, "experts", None) or [PREFIX])
    prefix = "" if len(components) > 1 else f"{PREFIX}."
    weights = {f"{prefix}{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}
    config = denoiser.peft_config[name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config = {f"{c}.{k}": v for c in components for k, v in config.items()}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(config, default=str),
        "vpotool.schema": "adapter",
        "vpotool.version": __version__,
        **{f"vpotool.{k}": v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()},
    }
    path = folder / ADAPTER_FILE
    write_safetensors(path, weights, metadata)
    return path


def adapter_metadata(folder: str | Path) -> dict[str, str]:
    """The metadata of a saved adapter; a missing or unreadable file raises ``VpoError``."""
    path = Path(folder) / ADAPTER_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise VpoError(f"no LoRA adapter at {folder} (expected {ADAPTER_FILE}; pass a checkpoints/step-N folder)")
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # noqa: BLE001 (a damaged file of any kind is the same user problem)
        raise VpoError(f"unreadable LoRA adapter {path}: {one_line(e)}") from e
    if not any("lora_" in k for k in keys):  # diffusers would load nothing and fail later, after sampling the base
        raise VpoError(
            f"{path} holds no LoRA weights ({len(keys)} tensors, none a lora_A/lora_B weight); pass a "
            "checkpoints/step-N folder written by a vpotool trainer"
        )
    return meta


def adapter_weights(denoiser, folder: str | Path, model: str, flag: str) -> dict[str, torch.Tensor]:
    """The weights of a saved adapter (keyed as :func:`adapter_state`) to load into ``denoiser``'s trainable
    adapter, refused in one line when it was saved for another model or with another rank or alpha (``flag``
    names the option that gave it)."""
    from safetensors.torch import load_file

    meta = adapter_metadata(folder)
    base = meta.get("vpotool.base_model")
    if base and base != model:
        raise VpoError(f"{flag} {folder} is an adapter for --model {base}, not {model}")
    saved = json.loads(meta.get("lora_adapter_metadata") or "{}")
    mine = denoiser.peft_config["default"]
    rank, alpha = saved.get(f"{PREFIX}.r"), saved.get(f"{PREFIX}.lora_alpha")
    if rank is not None and (rank != mine.r or float(alpha) != float(mine.lora_alpha)):
        raise VpoError(f"{flag} {folder} has LoRA rank {rank} and alpha {alpha}, this run {mine.r} and "
                       f"{mine.lora_alpha:g}; pass --lora-rank {rank} --lora-alpha {alpha}")  # fmt: skip
    path = Path(folder) / ADAPTER_FILE if Path(folder).is_dir() else Path(folder)
    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 (a damaged file of any kind is the same user problem)
        raise VpoError(f"{flag}: unreadable LoRA adapter {path}: {e}") from e
    return {k.removeprefix(f"{PREFIX}."): v for k, v in weights.items()}


def load_adapter(backend, folder: str | Path, name: str = "default") -> None:
    """Load a saved adapter into ``backend.denoiser`` as adapter ``name`` and record it in ``backend.info``."""
    meta = adapter_metadata(folder)
    base = meta.get("vpotool.base_model")
    if base and base != backend.info.name:
        raise VpoError(f"{folder} is an adapter for --model {base}, not {backend.info.name}")
    path = Path(folder) / ADAPTER_FILE if Path(folder).is_dir() else Path(folder)
    try:
        # Naming the safetensors file makes diffusers read ``lora_adapter_metadata`` (rank, alpha, targets); given a
        # bare path it falls back to alpha = rank and applies an adapter trained with alpha != rank at the wrong
        # strength.
        backend.denoiser.load_lora_adapter(
            str(path.parent),
            weight_name=path.name,
            use_safetensors=True,
            local_files_only=True,
            prefix=PREFIX,
            adapter_name=name,
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise VpoError(f"adapter {folder} does not fit this model: {str(e).splitlines()[0]}") from e
    backend.denoiser.set_adapter(name)
    backend.info.adapter = str(folder)
