"""Up-front refusal of requests no machine here could hold (``sample --candidates 1000000000``, ``--height 16000
--width 16000``, ``--lora-rank 1000000``), which otherwise failed with a traceback minutes later.

The rule: a lower bound of the memory a request needs, counted from tensors whose size is known before any work
(the videos of one denoiser call, a LoRA's weights and optimizer state), is compared with the total memory of the
device it runs on (a GPU's, or the machine's RAM for the CPU). Only a request whose lower bound exceeds the whole
device is refused, so a large run that fits a big GPU is never stopped; one that passes may still run out of
memory later (activations are not counted).
"""

from __future__ import annotations

import os

from vpotool.errors import VpoError

FLOAT32 = 4


def device_memory(device) -> tuple[int, str]:
    """``(bytes, name)``: the total memory of ``device`` (a CUDA device's, else this machine's RAM)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"{device} ({torch.cuda.get_device_name(index)})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(need: int, device, what: str, fix: str) -> None:
    """Refuse in one line when ``need`` bytes (a lower bound for ``what``) exceed the total memory of ``device``."""
    total, name = device_memory(device)
    if need > total:
        raise VpoError(f"{what} needs at least {gib(need)}, more than {name} has ({gib(total)}); {fix}")


def video_call_bytes(videos: int, latent_shape: tuple, frames: int, height: int, width: int) -> int:
    """A lower bound of the memory one sampler call over ``videos`` videos takes: the float32 noise and final
    latents (``latent_shape`` per video, ``[C, F, h, w]``) and the decoded float32 frames ``[T, 3, H, W]``."""
    latent = 1
    for n in latent_shape:
        latent *= n
    return videos * FLOAT32 * (2 * latent + frames * 3 * height * width)


def lora_parameters(denoiser, rank: int, targets: list[str]) -> int:
    """The number of parameters a rank-``rank`` LoRA on the ``targets`` modules of ``denoiser`` adds (matched as
    peft matches a list: the module's name or its last dotted parts): ``rank * (fan_in + fan_out)`` per module,
    from the module's weight ``[out, in, *kernel]``."""
    total = 0
    for name, module in denoiser.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() < 2 or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        fan_in = weight[0].numel()
        total += rank * (fan_in + weight.shape[0])
    return total
