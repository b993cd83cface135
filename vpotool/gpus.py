"""The GPUs a plan is judged against (``vpotool plan --gpu``, ``benchmarks/bench_gpu.py``): their memory and dense
peak FLOP rates, whether a planned peak fits one, and how long a step of some FLOPs takes on it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vpotool.errors import VpoError

GIB = 2**30
HEADROOM = int(1.5 * GIB)  # the CUDA context and allocator fragmentation, beyond the tensors the trace counts
UTILISATION = 0.4  # the share of a GPU's dense peak FLOP rate a step is assumed to reach, for the step time

# name: (memory in GiB, dense bf16 TFLOP/s, dense tf32 TFLOP/s), from the vendors' datasheets
GPUS = {
    "h100": (80, 989.4, 494.7),
    "h100-pcie": (80, 756, 378),
    "h100-nvl": (94, 835, 418),
    "h200": (141, 989.4, 494.7),
    "b200": (180, 2250, 1100),
    "a100": (80, 312, 156),
    "a100-40gb": (40, 312, 156),
    "l40s": (48, 362, 183),
    "a10": (24, 125, 62.5),
    "rtx4090": (24, 165, 82.6),
    "rtx3090": (24, 71, 35.6),
    "mi300x": (192, 1307, 654),
}


@dataclass
class Gpu:
    name: str
    memory: int  # bytes
    tflops: tuple[float, float] | None = None  # (bf16, tf32) dense peak, when known


def parse_gpu(text: str | None) -> Gpu | None:
    """``--gpu``: a known name (``h100``), a memory size (``80GB``, ``24GiB``), or None for the visible GPU (or
    none, on a machine without one). Unknown text is refused in one line."""
    if not text:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return Gpu(props.name, props.total_memory, known_tflops(props.name))
        return None
    key = text.strip().lower().replace("_", "-").replace(" ", "")
    if key in GPUS:
        gib, bf16, tf32 = GPUS[key]
        return Gpu(key, gib * GIB, (bf16, tf32))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gb|gib|g)", key)
    if m and 0 < float(m[1]) <= 100_000:  # a size no GPU has (0GB) would plan every run as "does not fit"
        return Gpu(text.strip(), int(float(m[1]) * GIB))
    raise VpoError(f"--gpu {text}: not a GPU vpotool knows nor a memory size; pass one of {', '.join(GPUS)}, "
                   "or a size such as 80GB")  # fmt: skip


def known_tflops(device_name: str) -> tuple[float, float] | None:
    """``(bf16, tf32)`` dense peak TFLOP/s of a GPU by its device name (``NVIDIA H100 PCIe`` -> ``h100-pcie``)."""
    name = device_name.lower().replace(" ", "-")
    key = next((k for k in sorted(GPUS, key=len, reverse=True) if k in name), None)
    return GPUS[key][1:] if key else None


def fits(peak: int, gpu: Gpu) -> str:
    """``fits``, ``tight`` (within 10% of what is left after ``HEADROOM``) or ``does not fit``."""
    room = gpu.memory - HEADROOM
    return "does not fit" if peak > room else "tight" if peak > 0.9 * room else "fits"


def step_seconds(flops: int, gpu: Gpu, bf16: bool) -> float | None:
    """Seconds a step of ``flops`` takes at ``UTILISATION`` of the GPU's dense bf16 (or tf32) peak; None when its
    peak is unknown."""
    if gpu.tflops is None or not flops:
        return None
    return flops / (gpu.tflops[0 if bf16 else 1] * 1e12 * UTILISATION)
