"""Teacher-force the built-in ``tiny-ar`` model: the tiny transformer made autoregressive on long world clips.

``python -m vpotool.world.pretrain_ar --out vpotool/assets/tiny-ar`` reproduces the shipped weights. It starts from
the shipped ``tiny`` model (its VAE, text encoder and tokenizer unchanged; its transformer's weights loaded into a
``SkyReelsV2Transformer3DModel``, the same architecture with a timestep per latent frame) and trains on latents of
long clips (:mod:`vpotool.world.long`):

- a quarter of the batches are single 17-frame segments (5 latent frames), all noised: the rollout's first chunk;
- the rest are two consecutive segments of a clip (10 latent frames), the first given clean (the ground truth:
  teacher forcing), the second noised and learned: every later chunk of the rollout.

Clips are coded segment by segment, as :class:`vpotool.models.tiny_ar.SegmentCodec` codes videos.

The loss is flow matching on the noised frames only. At sampling time the context is the model's own output, which
teacher forcing never showed it: the exposure bias that makes long rollouts drift.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from vpotool.models.base import flow_training_timesteps
from vpotool.world.grammar import world_prompts
from vpotool.world.long import render_long_clip
from vpotool.world.pretrain import Log, encode_text, lr_at

SEGMENT = 5  # latent frames of a 17-frame segment: a chunk, and the context of the next


@torch.no_grad()
def encode_long_clips(codec, n: int, frames: int, seed: int, batch: int = 16) -> tuple[torch.Tensor, list[str]]:
    """``n`` long clips of random training prompts and placements, coded once by ``codec`` (a
    :class:`~vpotool.models.tiny_ar.SegmentCodec`): ``(latents [n, C, F, h, w], prompts)``."""
    rng = random.Random(seed)
    prompts = world_prompts("train")
    out, texts = [], []
    for start in range(0, n, batch):
        chosen = [rng.choice(prompts) for _ in range(min(batch, n - start))]
        clips = torch.stack([render_long_clip(p, frames, seed=rng.randrange(2**31)) for p in chosen])
        out.append(codec.encode(clips))
        texts += [p.text for p in chosen]
    return torch.cat(out), texts


def teacher_forcing_batch(latents, gen: torch.Generator, batch: int, first: bool, shift: float):
    """One batch: ``(x_t [B, C, W, h, w], timesteps [B, W], target, learned [B, W], clip index [B])``, W = 5 for a
    ``first`` batch (one segment, all noised), else 10 (a clean segment, then the next one noised). Context frames
    keep timestep 0 and their clean latents."""
    n, _, f = latents.shape[:3]
    idx = torch.randint(n, (batch,), generator=gen)
    segments = f // SEGMENT
    k = torch.zeros(batch, dtype=torch.long) if first else torch.randint(segments - 1, (batch,), generator=gen)
    width = SEGMENT if first else 2 * SEGMENT
    x0 = torch.stack(
        [latents[i, :, s * SEGMENT : s * SEGMENT + width] for i, s in zip(idx.tolist(), k.tolist(), strict=True)]
    )
    learned = torch.ones(batch, width, dtype=torch.bool)
    if not first:
        learned[:, :SEGMENT] = False
    sched = flow_training_timesteps(batch, shift, gen)
    noise = torch.randn(x0.shape, generator=gen)
    s = sched.sigmas.view(-1, 1, 1, 1, 1) * learned[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * noise
    timesteps = sched.timesteps[:, None] * learned
    return x_t, timesteps, noise - x0, learned, idx


def train(transformer, text_encoder, tokenizer, latents, texts, steps, batch, lr, drop, seed, shift, t0):
    """Teacher forcing (module docstring); returns the final mean loss on the learned frames."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    log = Log("tiny-ar", steps, 50, t0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 50)
        first = rng.random() < 0.25
        x_t, timesteps, target, learned, idx = teacher_forcing_batch(latents, gen, batch, first, shift)
        captions = [texts[i] if rng.random() >= drop else "" for i in idx.tolist()]
        with torch.no_grad():
            cond = encode_text(text_encoder, tokenizer, captions)
        pred = transformer(
            hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond, enable_diffusion_forcing=True,
            return_dict=False,
        )[0]  # fmt: skip
        err = (pred - target).square().mean((1, 3, 4))  # [B, 5]
        loss = (err * learned).sum() / learned.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        log(step, loss.item())
    transformer.eval()
    return log.mean


def pretrain_ar(out: str, clips=2048, frames=49, steps=1200, batch=16, lr=3e-4, drop=0.1, seed=0) -> dict:
    """Build ``tiny-ar`` from the shipped ``tiny`` model, teacher-force it, save a SkyReels-V2 DF folder to ``out``
    (plus pretrain.json). Returns what was recorded."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel, WanPipeline

    from vpotool.models.tiny import ASSET_DIR, TINY_SHIFT
    from vpotool.models.tiny_ar import SegmentCodec
    from vpotool.models.wan import WanVaeCodec

    t0 = time.perf_counter()
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    tiny = WanPipeline.from_pretrained(str(ASSET_DIR))
    config = {k: v for k, v in tiny.transformer.config.items() if not k.startswith("_")}
    transformer = SkyReelsV2Transformer3DModel(**config)
    transformer.load_state_dict(tiny.transformer.state_dict())
    latents, texts = encode_long_clips(SegmentCodec(WanVaeCodec(tiny.vae.eval())), clips, frames, seed + 1)
    encode_minutes = (time.perf_counter() - t0) / 60
    loss = train(transformer, tiny.text_encoder.eval(), tiny.tokenizer, latents, texts, steps, batch, lr, drop,
                 seed + 2, TINY_SHIFT, t0)  # fmt: skip
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, transformer=transformer, vae=tiny.vae,
        scheduler=tiny.scheduler,
    )  # fmt: skip
    folder = Path(out)
    pipe.save_pretrained(folder)
    record = dict(
        seed=seed, clips=clips, clip_frames=frames, segment=SEGMENT, steps=steps, batch=batch, lr=lr,
        drop=drop, first_share=0.25, loss=round(loss, 5), encode_minutes=round(encode_minutes, 1),
        minutes=round((time.perf_counter() - t0) / 60, 1), threads=torch.get_num_threads(),
    )  # fmt: skip
    (folder / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the model to (vpotool/assets/tiny-ar ships it)")
    ap.add_argument("--clips", type=int, default=2048, help="long clips encoded for teacher forcing")
    ap.add_argument("--frames", type=int, default=49, help="frames of each long clip (4k + 1)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from vpotool.models.loading import quiet_loading

    quiet_loading()
    record = pretrain_ar(args.out, args.clips, args.frames, args.steps, args.batch, args.lr, seed=args.seed)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
