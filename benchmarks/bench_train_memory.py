"""Peak memory of one training step, by method and frame count (the scalability comparison of OnlineVPO).

Each configuration runs in a fresh process: set up the tiny model with a LoRA adapter, then take one optimizer
step; the figure is the process's peak resident memory minus its resident memory before any model was built, so it
counts weights (and a reference copy) as well as the step's activations and gradients (CPU; on a GPU the same
step would be measured with torch.cuda.max_memory_allocated). ``--big`` swaps in a ~40M-parameter denoiser so
that weights weigh something. Methods:

- dpo: train-dpo's step, the reference being the same denoiser with the adapter disabled;
- dpo-copy: the same loss with a separate frozen copy of the denoiser as the reference;
- lora: plain LoRA fine-tuning (denoising MSE) on the same 2B latents a DPO step sees;
- refl-k1 / refl-kall: train-refl's step with gradients through the last 1 / all denoising steps.

    python benchmarks/bench_train_memory.py [--frames 8,16,32] [--size 32] [--batch 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys

METHODS = ["lora", "dpo", "dpo-copy", "refl-k1", "refl-kall"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BIG = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=8)  # ~40M parameters


def one(method: str, frames: int, size: int, batch: int, steps: int, big: bool) -> float:
    import torch

    from vpotool.losses import per_sample_mse
    from vpotool.models import load_backend
    from vpotool.models.base import cond_cat
    from vpotool.sampling import training_target
    from vpotool.training.config import DpoConfig, ReflConfig
    from vpotool.training.dpo import pair_loss
    from vpotool.training.lora import add_lora
    from vpotool.training.refl import refl_rollout

    torch.manual_seed(0)
    start = rss_mb()  # after imports, before any model: the figure includes weights, a reference copy too
    b = load_backend("tiny")
    if big:
        from diffusers import WanTransformer3DModel

        from vpotool.models.tiny import TINY_TRANSFORMER

        b.denoiser = WanTransformer3DModel(**{**TINY_TRANSFORMER, **BIG}).eval()
    frozen = copy.deepcopy(b.denoiser) if method == "dpo-copy" else None
    params = add_lora(b.denoiser, 16, 16, b.lora_target_modules)
    b.denoiser.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    shape = b.latent_shape(frames, size, size)
    x0_w, x0_l = torch.randn(batch, *shape), torch.randn(batch, *shape)
    cond = b.encode_prompts(["a red circle moving left"] * batch)
    seeds = list(range(batch))
    dcfg = DpoConfig(pairs="x", out="x", beta=500.0)
    rcfg = ReflConfig(prompts="x", out="x", backprop_steps=1 if method == "refl-k1" else steps)
    settings = {"frames": frames, "height": size, "width": size, "steps": steps, "guidance": 1.0}
    if method == "dpo":
        loss = pair_loss(b, b.denoiser, x0_w, x0_l, cond, seeds, dcfg, "base").loss
    elif method == "dpo-copy":
        from vpotool.training import dpo

        policy = b.denoiser

        @contextlib.contextmanager
        def copy_as_reference(denoiser, mode):  # the reference pass runs through the frozen copy
            b.denoiser = frozen
            try:
                yield
            finally:
                b.denoiser = policy

        dpo.reference_mode = copy_as_reference  # this process measures one configuration, then exits
        loss = pair_loss(b, b.denoiser, x0_w, x0_l, cond, seeds, dcfg, "base").loss
    elif method == "lora":
        x0 = torch.cat([x0_w, x0_l])
        sched = b.training_timesteps(2 * batch, torch.Generator().manual_seed(0), shape)
        noise = torch.randn_like(x0)
        a, s = sched.alphas.view(-1, 1, 1, 1, 1), sched.sigmas.view(-1, 1, 1, 1, 1)
        pred = b.predict(a * x0 + s * noise, sched.timesteps, cond_cat(cond, cond))
        loss = per_sample_mse(pred, training_target(b.prediction, x0, noise, a, s)).mean()
    else:
        frames_out = refl_rollout(b, ["a red circle"] * batch, seeds, settings, rcfg, torch.Generator())
        loss = -frames_out.mean()
    loss.backward()
    opt.step()
    return peak_mb() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="8,16,32")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--big", action="store_true", help="a ~40M-parameter denoiser instead of the tiny one")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "FRAMES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.size, args.batch, args.steps, args.big)))
        return
    frames = [int(f) for f in args.frames.split(",")]
    table = {}
    for f in frames:
        for m in METHODS:
            cmd = [sys.executable, __file__, "--one", m, str(f), "--size", str(args.size), "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps)] + (["--big"] if args.big else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            table[m, f] = float(out.stdout.strip().splitlines()[-1])
    model = "~40M-parameter denoiser" if args.big else "tiny model"
    print(f"peak memory of model + one training step (MB, above the imported libraries): {model}, CPU, "
          f"{args.size}x{args.size}, batch {args.batch} pairs / prompts, rollouts of {args.steps} steps")  # fmt: skip
    print()
    print("| method | " + " | ".join(f"{f} frames" for f in frames) + " |")
    print("|---|" + "---|" * len(frames))
    for m in METHODS:
        print(f"| {m} | " + " | ".join(f"{table[m, f]:.0f}" for f in frames) + " |")
    print()
    print("| ratio | " + " | ".join(f"{f} frames" for f in frames) + " |")
    print("|---|" + "---|" * len(frames))
    for num, den in [("dpo", "lora"), ("dpo-copy", "dpo"), ("refl-kall", "refl-k1"), ("refl-kall", "dpo")]:
        print(f"| {num} / {den} | " + " | ".join(f"{table[num, f] / table[den, f]:.2f}" for f in frames) + " |")


if __name__ == "__main__":
    main()
