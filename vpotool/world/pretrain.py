"""Pretrain the built-in ``tiny`` model on rendered clips of the world's training prompts (flow matching).

``python -m vpotool.world.pretrain --out vpotool/assets/tiny`` reproduces the shipped weights (same seed, same
steps; a few tens of minutes on two CPU cores). The run is deliberately short: the model learns the world's
look but still gets colours, shapes and motion wrong often enough for alignment to have something to fix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from vpotool.models.base import flow_training_timesteps
from vpotool.models.tiny import TINY_CONFIG, TINY_DEFAULTS, build_tiny_components, save_tiny, tiny_backend
from vpotool.sampling import training_target
from vpotool.world.grammar import world_prompts
from vpotool.world.render import render_batch

CARD = """# tiny: the built-in vpotool model

A {params:.2f}M-parameter Wan-style flow transformer ({layers} layers, width {width}) in pixel space (4x4 pixel
unshuffle instead of a VAE) with a {te_params:.2f}M-parameter UMT5 text encoder over the tiny world's words. It
makes {frames} frames of {height}x{width_px} pixels at {fps} fps. Its velocity is preconditioned EDM-style
(`vpotool.models.tiny.TinyBackend`, sigma_data {sigma_data}), so the small network learns a residual instead of
copying the noise through itself, and it sees each position's (x, y, t) as three extra input channels.

**Data.** Clips rendered by `vpotool.world.render` for the {n_train} training prompts of the world grammar
(`vpotool.world.world_prompts("train")`), a fresh random placement for every example. The {n_heldout} held-out
prompts (unseen colour-shape-direction combinations) were never shown.

**Training.** Flow matching (velocity target, sigma uniform), AdamW lr {lr} with {warmup} warmup steps and
cosine decay, batch {batch}, {steps} steps, the prompt dropped for {drop:.0%} of examples (for guidance), seed
{seed}, float32 on CPU ({threads} threads). It stopped on purpose well short of convergence (final loss
{loss:.4f}), so that alignment has room to improve it.

**Reproduce.**

    python -m vpotool.world.pretrain --out vpotool/assets/tiny --steps {steps} --seed {seed}

Took {minutes:.1f} minutes here.
"""


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    out: str,
    steps: int = 3000,
    batch: int = 16,
    lr: float = 2e-3,
    warmup: int = 100,
    drop: float = 0.1,
    seed: int = 0,
    log_every: int = 50,
    save_every: int = 0,
) -> float:
    """Train the tiny model from scratch and save it (``save_tiny`` layout plus README.md) to ``out``.

    Returns the mean loss over the last ``log_every`` steps."""
    t0 = time.perf_counter()
    transformer, text_encoder, tokenizer = build_tiny_components(seed=seed)
    backend = tiny_backend(transformer, text_encoder, tokenizer, TINY_CONFIG, "pretraining")
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    prompts = world_prompts("train")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d = TINY_DEFAULTS
    recent: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        chosen = [rng.choice(prompts) for _ in range(batch)]
        clips = render_batch(chosen, [rng.randrange(2**31) for _ in chosen], d.frames, d.height, d.width)
        x0 = backend.encode(clips)
        texts = [p.text if rng.random() >= drop else "" for p in chosen]
        cond = backend.encode_prompts(texts)
        sched = flow_training_timesteps(batch, backend.shift, gen)
        noise = torch.randn(x0.shape, generator=gen)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in (sched.alphas, sched.sigmas))
        pred = backend.predict(a * x0 + s * noise, sched.timesteps, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), training_target("flow", x0, noise, a, s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = (time.perf_counter() - t0) / 60
            print(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  {elapsed:.1f} min", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_tiny(Path(out) / f"step-{step + 1}", transformer, text_encoder, tokenizer)

    final = sum(recent) / len(recent)
    folder = Path(out)
    save_tiny(folder, transformer.eval(), text_encoder.eval(), tokenizer)
    tc = TINY_CONFIG["transformer"]
    card = CARD.format(
        params=sum(p.numel() for p in transformer.parameters()) / 1e6,
        te_params=sum(p.numel() for p in text_encoder.parameters()) / 1e6,
        layers=tc["num_layers"],
        width=tc["num_attention_heads"] * tc["attention_head_dim"],
        frames=d.frames,
        height=d.height,
        width_px=d.width,
        fps=d.fps,
        sigma_data=TINY_CONFIG["sigma_data"],
        n_train=len(prompts),
        n_heldout=len(world_prompts("heldout")),
        lr=lr,
        warmup=warmup,
        batch=batch,
        steps=steps,
        drop=drop,
        seed=seed,
        threads=torch.get_num_threads(),
        loss=final,
        minutes=(time.perf_counter() - t0) / 60,
    )
    (folder / "README.md").write_text(card)
    (folder / "pretrain.json").write_text(
        json.dumps(dict(steps=steps, batch=batch, lr=lr, warmup=warmup, drop=drop, seed=seed, loss=final), indent=2)
        + "\n"
    )
    return final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the model to (vpotool/assets/tiny ships it)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=0, help="also save a snapshot to OUT/step-N every N steps")
    args = ap.parse_args(argv)
    from vpotool.models.loading import quiet_loading

    quiet_loading()
    pretrain(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, save_every=args.save_every)


if __name__ == "__main__":
    main()
