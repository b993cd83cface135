"""What the memory options save: peak memory and time of one DPO and one ReFL optimizer step, with and without the
text-embedding cache, text-encoder offload and VAE checkpointing.

Each configuration runs in a fresh process on the tiny model with a ~40M-parameter denoiser and a ~0.2B-parameter
UMT5 text encoder (both random, built in code), so that the text encoder weighs what a real one does relative to
the denoiser; the ReFL rows decode through a random CogVideoX VAE (widths 64-128, 16 latent channels), whose
decoder blocks can be recomputed. The figure is the process's peak memory above its memory after imports (CPU:
resident memory; CUDA: ``torch.cuda.max_memory_allocated``), and the wall time of the step after one warm-up step.

- dpo-encode: the prompts re-encoded every micro-batch (what trainers did before the cache);
- dpo-cache: each prompt encoded once per run (``backend.condition``, the default);
- dpo-offload: ``--offload-text-encoder``: after encoding, the encoder and embeddings sit in CPU memory. On a CPU
  run this moves nothing (the figure equals dpo-cache); on a GPU it frees the encoder's weights from the device;
- refl: train-refl's step, gradients through the last denoising step and the VAE decode;
- refl-vae-ckpt: the same with ``--vae-checkpointing`` (the decoder's blocks recomputed in the backward pass).

    python benchmarks/bench_memory_options.py [--frames 17] [--size 64] [--batch 2] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ["dpo-encode", "dpo-cache", "dpo-offload", "refl", "refl-vae-ckpt"]
BIG_DENOISER = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=8)  # ~40M parameters
BIG_TEXT = dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=12, num_heads=16)  # ~0.2B parameters


def memory_mb(device: str) -> float:
    """Peak memory so far: the CUDA allocator's peak, or the process's peak resident memory on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cogvideox_codec(device: str):
    """A random CogVideoX VAE (8x spatial, 4x temporal, 16 channels) as the tiny backend's codec."""
    from diffusers import AutoencoderKLCogVideoX

    from vpotool.models.cogvideox import CogVideoXVaeCodec

    vae = AutoencoderKLCogVideoX(
        block_out_channels=(64, 128, 128, 128), latent_channels=16, layers_per_block=1, norm_num_groups=32,
        temporal_compression_ratio=4,
    )  # fmt: skip
    return CogVideoXVaeCodec(vae.to(device).eval().requires_grad_(False))


def build(device: str, method: str):
    """The tiny backend with the large denoiser and text encoder (and, for ReFL, a CogVideoX VAE) on ``device``."""
    import torch
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from vpotool.models import load_backend
    from vpotool.models.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    b = load_backend("tiny", None, device)
    denoiser = {**TINY_TRANSFORMER, **BIG_DENOISER, "text_dim": BIG_TEXT["d_model"]}
    b.denoiser = WanTransformer3DModel(**denoiser).to(device).eval()
    config = UMT5Config(**{**b.text_encoder.config.to_dict(), **BIG_TEXT})
    b.text_encoder = UMT5EncoderModel(config).to(device).eval().requires_grad_(False)
    if method.startswith("refl"):
        b.codec = cogvideox_codec(device)
    return b


def one(method: str, frames: int, size: int, batch: int, steps: int, device: str) -> tuple[float, float]:
    """Peak memory (MB above imports) and seconds of one step of ``method`` (after a warm-up step)."""
    import torch

    from vpotool.training.config import DpoConfig, ReflConfig
    from vpotool.training.dpo import pair_loss
    from vpotool.training.lora import add_lora
    from vpotool.training.refl import enable_vae_checkpointing, refl_rollout

    start = memory_mb(device)
    b = build(device, method)
    params = add_lora(b.denoiser, 16, 16, b.lora_target_modules)
    b.denoiser.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    prompts = [f"a red circle moving left number {i}" for i in range(batch)]
    shape = b.latent_shape(frames, size, size)
    x0_w, x0_l = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
    if method == "dpo-offload":
        b.offload_text_encoder(prompts)
    dcfg = DpoConfig(pairs="x", out="x", beta=500.0)
    rcfg = ReflConfig(prompts="x", out="x", backprop_steps=1)
    if method == "refl-vae-ckpt":
        enable_vae_checkpointing(b)
    settings = {"frames": frames, "height": size, "width": size, "steps": steps, "guidance": 1.0}

    def step():
        if method.startswith("dpo"):
            cond = b.encode_prompts(prompts) if method == "dpo-encode" else b.condition(prompts)
            loss = pair_loss(b, b.denoiser, x0_w, x0_l, cond, list(range(batch)), dcfg, "base").loss
        else:
            frames_out = refl_rollout(b, prompts, list(range(batch)), settings, rcfg, torch.Generator())
            loss = -frames_out.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return memory_mb(device) - start, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.frames, args.size, args.batch, args.steps, args.device)))
        return
    rows = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--one", m, "--frames", str(args.frames), "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[m] = json.loads(out.stdout.strip().splitlines()[-1])
    where = "peak resident memory" if args.device == "cpu" else "peak allocated GPU memory"
    print(f"one optimizer step, {where} above imports (MB) and time: ~40M-parameter denoiser, ~0.2B text encoder, "
          "CogVideoX VAE for ReFL, "
          f"{args.frames} frames {args.size}x{args.size}, batch {args.batch}, ReFL rollouts of {args.steps} steps, "
          f"{args.device}")  # fmt: skip
    print()
    print("| method | peak MB | s / step |")
    print("|---|---:|---:|")
    for m in METHODS:
        print(f"| {m} | {rows[m][0]:.0f} | {rows[m][1]:.2f} |")
    print()
    print("| ratio | memory | time |")
    print("|---|---:|---:|")
    for num, den in [("dpo-cache", "dpo-encode"), ("dpo-offload", "dpo-cache"), ("refl-vae-ckpt", "refl")]:
        mem, sec = rows[num][0] / rows[den][0], rows[num][1] / rows[den][1]
        print(f"| {num} / {den} | {mem:.2f} | {sec:.2f} |")


if __name__ == "__main__":
    main()
