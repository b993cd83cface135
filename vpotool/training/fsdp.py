"""FSDP (PyTorch's FSDP2, ``fully_shard``) for the trainers: when a run asks for it, sharding the denoiser where
accelerate does not (CPU processes), and moving adapter weights and optimizer moments between shards and full
tensors, so that a checkpoint holds the same files whatever the number of processes."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from vpotool.errors import VpoError


def requested() -> bool:
    """True when the run has several processes and asks for FSDP: ``ACCELERATE_USE_FSDP=true``, which
    ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets, or set by hand for ``torchrun``."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP") and int(os.environ.get("WORLD_SIZE", "1")) > 1


def refuse(what: str, why: str, instead: str = "") -> None:
    """Stop in one line when FSDP is requested for ``what``, which it cannot run: every process must call the
    sharded denoiser the same number of times, in step (each call gathers its weights from all of them)."""
    if requested():
        instead = f"{instead}, or " if instead else ""
        raise VpoError(f"{what} cannot run under FSDP ({why}); {instead}launch without ACCELERATE_USE_FSDP (DDP)")


def is_sharded(module) -> bool:
    """Whether ``module`` is an FSDP2 root: its parameters are DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_if_requested(accelerator, denoiser, model: str) -> bool:
    """Before the optimizer exists: when FSDP is requested and accelerate will not shard (CPU processes), shard
    ``denoiser`` (--model ``model``) with :func:`shard` and say so. Returns whether it did. Refuses, in one line, an
    FSDP1 accelerate config and a two-expert denoiser."""
    from accelerate.utils import DistributedType

    by_accelerate = accelerator.distributed_type == DistributedType.FSDP
    if by_accelerate and not accelerator.is_fsdp2:
        raise VpoError(
            "vpotool trains under FSDP2 only: set fsdp_version: 2 in the accelerate config (see "
            "examples/accelerate/fsdp.yaml)"
        )
    if not requested():
        return False
    if getattr(denoiser, "experts", None):
        raise VpoError(
            f"--model {model}: a two-expert denoiser cannot be sharded (a process whose micro-batch needs one "
            "expert would wait for the other's weights); launch without ACCELERATE_USE_FSDP (DDP)"
        )
    if by_accelerate:
        return False
    kind = type(denoiser).__name__  # before fully_shard swaps in its FSDP subclass
    blocks = shard(denoiser, accelerator.device)
    units = f"{blocks} transformer block{'s' * (blocks != 1)} and the root"
    accelerator.print(f"FSDP: {kind} sharded over {accelerator.num_processes} processes ({units})")
    return True


def shard(denoiser, device: torch.device) -> int:
    """Shard ``denoiser`` in place over all processes on ``device``: each transformer block (every entry of its
    top-level ``ModuleList``s: Wan's ``blocks``, CogVideoX's and LTX's ``transformer_blocks``, Open-Sora's
    spatial and temporal blocks) is one unit, gathered for its forward and freed after, and the root holds the rest.
    Call after adding the LoRA adapters and before creating the optimizer, which must hold the sharded parameters.
    Returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The diffusers denoisers return a view (their unpatchify reshape), and FSDP warns on every forward that an
    # in-place op on it would skip the backward's all-gather; vpotool's losses and sampler use it out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)
    return len(blocks)


def gradient_sync(denoiser, enabled: bool):
    """Context in which the sharded ``denoiser``'s backward passes reduce-scatter their gradients (``enabled``) or
    keep accumulating them unsharded for a later one (the micro-batches before an optimizer step's last)."""
    if enabled:
        return contextlib.nullcontext()
    return _no_gradient_sync(denoiser)


@contextlib.contextmanager
def _no_gradient_sync(denoiser):
    denoiser.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        denoiser.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a DTensor is gathered from every process (a collective all of them join)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor of ``param``'s shape, the same on every process) as ``param`` holds it: this
    process's shard when ``param`` is a DTensor (cut locally, nothing is sent), else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value.to(param.device)
    if isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full_adapters(denoiser) -> dict[str, torch.Tensor]:
    """Every LoRA weight of the sharded ``denoiser``, gathered whole onto the CPU of every process and keyed as in
    its state dict (``blocks.0.attn1.to_q.lora_A.default.weight``). Only the adapters travel, not the frozen model."""
    return {n: full_tensor(p) for n, p in denoiser.named_parameters() if "lora_" in n}


def load_adapter_shards(denoiser, state: dict[str, torch.Tensor], name: str) -> list[str]:
    """Copy ``state`` (full tensors or DTensors, keyed as :func:`~vpotool.training.lora.adapter_state` returns
    them) into adapter ``name`` of the sharded ``denoiser``, each process keeping its shard. Returns the keys that
    fit no parameter."""
    # peft's key for a weight is its parameter name without the adapter name (get_peft_model_state_dict).
    named = denoiser.named_parameters()
    params = {n.replace(f".{name}", ""): p for n, p in named if "lora_" in n and f".{name}." in n}
    unexpected = []
    with torch.no_grad():
        for key, value in state.items():
            param = params.get(key)
            if param is None:
                unexpected.append(key)
                continue
            param.copy_(like(value.to(param.dtype), param))
    return unexpected
