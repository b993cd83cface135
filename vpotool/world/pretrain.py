"""Pretrain the built-in ``tiny`` model on rendered clips of the world's training prompts, from scratch.

``python -m vpotool.world.pretrain --out vpotool/assets/tiny`` reproduces the shipped weights (same seed, same
steps). Three stages, as a latent video model is made:

1. the Wan VAE learns to reconstruct clips (MSE plus a small KL term), on short windows of the pretraining mix;
2. a fixed set of pretraining clips is encoded once, and the per-channel latent mean and std are written to the
   VAE's config (``latents_mean`` / ``latents_std``, as Wan's VAE ships them);
3. the Wan transformer and the text encoder learn flow matching (velocity target) on those latents, the caption
   dropped for a share of examples so that classifier-free guidance works.

The data is :data:`vpotool.world.data.DATA_MIX`: mostly clean clips, with known shares of lying captions and of
static, stuttering and flickering clips, so that the model has defects for alignment to fix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vpotool.models.base import flow_training_timesteps, tokenize
from vpotool.models.tiny import TINY_DEFAULTS, TINY_SHIFT, TINY_TEXT_LEN, build_tiny_pipeline
from vpotool.world.data import DATA_MIX, training_example
from vpotool.world.grammar import world_prompts


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_batch(rng: random.Random, n: int, frames: int) -> tuple[list[str], torch.Tensor]:
    """``n`` pretraining examples: captions, and clips as the VAE takes them (``[n, 3, T, H, W]`` in [-1, 1])."""
    d = TINY_DEFAULTS
    prompts = world_prompts("train")
    out = [training_example(rng.choice(prompts), rng, frames, d.height, d.width) for _ in range(n)]
    clips = torch.stack([c for _, c, _ in out]).permute(0, 2, 1, 3, 4) * 2 - 1
    return [t for t, _, _ in out], clips


class Log:
    """Running mean of the last ``every`` losses, printed every ``every`` steps with the elapsed time."""

    def __init__(self, name: str, steps: int, every: int, t0: float):
        self.name, self.steps, self.every, self.t0, self.recent = name, steps, every, t0, []

    def __call__(self, step: int, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.every :]
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            minutes = (time.perf_counter() - self.t0) / 60
            print(f"{self.name} {step + 1}/{self.steps}  loss {self.mean:.4f}  {minutes:.1f} min", flush=True)

    @property
    def mean(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))


def train_vae(vae, phase: dict, seed: int, t0: float, save_to: Path | None = None) -> float:
    """Stage 1, one phase: reconstruct ``phase["window"]``-frame clips of the mix for ``phase["steps"]`` steps
    (batch, lr, KL weight, foreground weight and the cosine schedule's length from ``phase``). Returns the final
    mean reconstruction MSE.

    The shape covers under a tenth of a frame, so the squared error of shape pixels (those unlike the clip's
    corner colour) counts ``1 + fg_weight`` times; without it the autoencoder first settles on painting the
    background alone. The window must span several 4-frame chunks: the causal VAE encodes the first frame alone
    and then chunk after chunk, and learns the hand-over from one chunk to the next only from windows that have
    it."""
    steps, lr, kl, fg_weight = phase["steps"], phase["lr"], phase["kl"], phase["fg_weight"]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    log = Log("vae", steps, 50, t0)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, phase["schedule"], lr, 50)
        _, x = draw_batch(rng, phase["batch"], phase["window"])
        posterior = vae.encode(x).latent_dist
        # Decoding the posterior mode, not a sample: with the encoder's initial unit variance a sample drowns the
        # latent. The diffusion stage uses the mode too.
        err = (vae.decode(posterior.mode()).sample - x).square()
        fg = ((x - x[..., :1, :1]).abs().sum(1, keepdim=True) > 0.1).to(err.dtype)
        kl_term = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
        opt.zero_grad(set_to_none=True)
        ((err * (1 + fg_weight * fg)).mean() + kl * kl_term).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log(step, err.mean().item())
        if save_to is not None and (step + 1) % 250 == 0:
            vae.save_pretrained(save_to / f"vae-step-{step + 1}")
    vae.eval()
    return log.mean


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Stage 2: ``n`` full-length clips of the mix encoded once (posterior mode), normalised per channel; the
    mean and std land in the VAE's config. Returns ``(latents [n, C, F, h, w], captions)``."""
    rng = random.Random(seed)
    latents, captions = [], []
    for start in range(0, n, batch):
        c, x = draw_batch(rng, min(batch, n - start), TINY_DEFAULTS.frames)
        latents.append(vae.encode(x).latent_dist.mode())
        captions += c
    z = torch.cat(latents)
    mean, std = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), captions


def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """UMT5 states of ``captions`` with the padding zeroed, as ``WanPipeline`` and vpotool's Wan backend do (the
    backend's ``encode_prompts`` runs without gradients; here the text encoder trains)."""
    ids, mask = tokenize(tokenizer, captions, TINY_TEXT_LEN, "cpu")
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def train_denoiser(pipe, latents, captions, steps: int, batch: int, lr: float, drop: float, seed: int, t0: float):
    """Stage 3: flow matching of the transformer and the text encoder on the encoded clips. Returns the final
    mean loss."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    transformer, text_encoder = pipe.transformer.train(), pipe.text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    log = Log("denoiser", steps, 100, t0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 200)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        texts = [captions[i] if rng.random() >= drop else "" for i in idx.tolist()]
        sched = flow_training_timesteps(batch, TINY_SHIFT, gen)
        noise = torch.randn(x0.shape, generator=gen)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in (sched.alphas, sched.sigmas))
        pred = transformer(
            hidden_states=a * x0 + s * noise,
            timestep=sched.timesteps,
            encoder_hidden_states=encode_text(text_encoder, pipe.tokenizer, texts),
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log(step, loss.item())
    transformer.eval()
    text_encoder.eval()
    return log.mean


CARD = """# tiny: the built-in vpotool model

A small Wan 2.1-style latent text-to-video model of the tiny world, saved as a complete diffusers `WanPipeline`
folder. vpotool loads it through its Wan code path (`--model tiny`); diffusers loads it with
`WanPipeline.from_pretrained(folder)` and samples the same latents as `vpotool sample` given the same noise
(pass `max_sequence_length={text_len}`, the length vpotool encodes prompts at; a test holds the two equal).

| part | what |
|---|---|
| VAE | `AutoencoderKLWan`, width {vae_dim}, 4x spatial, 4x temporal compression to {z} channels, {vae_params:.2f}M |
| denoiser | `WanTransformer3DModel`, {layers} layers, width {width}, patch (1, 2, 2), {params:.2f}M parameters |
| text encoder | `UMT5EncoderModel`, {te_layers} layers, width 32, word-level tokenizer, {te_params:.3f}M parameters |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {shift} |
| video | {frames} frames of {height}x{width_px} at {fps} fps (any 4k+1 frames and multiples of 8 pixels work) |

**Data.** Clips rendered by `vpotool.world.render` for the {n_train} training prompts of the world grammar; the
{n_heldout} held-out prompts (unseen colour-shape-direction combinations) were never shown. The mix has known
imperfections, as real video data does (`vpotool.world.data.DATA_MIX`):

{mix}

**Training** (`python -m vpotool.world.pretrain`, seed {seed}, float32 on CPU, {threads} threads):
1. VAE: {vae_text}; AdamW, MSE with shape pixels weighted 3x, plus 1e-4 x KL. Final reconstruction MSE
   {vae_mse} (pixels in [-1, 1]).
2. {clips} clips of the mix encoded once; per-channel latent mean and std written to the VAE config.
3. Denoiser and text encoder: flow matching (velocity target, shifted uniform sigma), {steps} steps of batch
   {batch}, AdamW lr {lr} (warmup, cosine), captions dropped for {drop:.0%} of examples; final loss {loss}.

Time on 2 CPU cores: {minutes_text}.

**Measured** on the {n_heldout} held-out prompts x {seeds} seeds, default settings ({steps_s} steps, guidance
{guidance}), with `vpotool.world.rates` (definitions in docs/world.md):

{rates}

**Reproduce.**

    python -m vpotool.world.pretrain --out vpotool/assets/tiny
"""


def measure(folder: str, seeds: int = 2, batch: int = 16) -> dict:
    """World rates and mean world reward of the model in ``folder`` on the held-out prompts x ``seeds``, with
    its default sampler settings and ``eval``'s per-video seeds."""
    from vpotool.models import load_backend
    from vpotool.rewards import load_reward
    from vpotool.stages.common import video_seed
    from vpotool.stages.sample import generate
    from vpotool.world.rates import clip_checks, rates

    backend = load_backend("tiny", folder)
    d = backend.defaults
    settings = dict(frames=d.frames, height=d.height, width=d.width, steps=d.steps, guidance=d.guidance,
                    noise_level=0.0)  # fmt: skip
    jobs = [(p, video_seed(0, p.id, k)) for p in world_prompts("heldout") for k in range(seeds)]
    checks, overall = [], []
    reward = load_reward("world")
    for i in range(0, len(jobs), batch):
        prompts = [p.text for p, _ in jobs[i : i + batch]]
        with torch.no_grad():
            _, frames = generate(backend, prompts, [s for _, s in jobs[i : i + batch]], settings)
            overall += reward(frames, prompts)["overall"].tolist()
        checks += clip_checks(frames, prompts)
    return {**rates(checks), "world_overall": sum(overall) / len(overall), "videos": len(jobs), "seeds": seeds}


def write_card(folder: str | Path) -> None:
    """``folder/README.md`` from ``pretrain.json`` (what training recorded, with ``measured`` rates)."""
    from vpotool.models.tiny import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

    folder = Path(folder)
    rec = json.loads((folder / "pretrain.json").read_text())
    from safetensors.torch import load_file

    pipe_params = {
        part: sum(t.numel() for f in (folder / part).glob("*.safetensors") for t in load_file(str(f)).values()) / 1e6
        for part in ("transformer", "vae", "text_encoder")
    }
    m = rec["measured"]
    vae_text = "; then ".join(
        f"{p['steps']} steps of batch {p['batch']} on {p['window']}-frame windows at lr {p['lr']}"
        for p in rec["vae_phases"]
    )
    minutes_text = rec.get("minutes_text") or f"{rec['minutes']} minutes in all"
    fields = {"vae_mse": "(not recorded)", **{k: v for k, v in rec.items() if k != "minutes_text"}}
    d = TINY_DEFAULTS
    mix = "\n".join(f"- {kind.replace('_', ' ')}: {share:.0%}" for kind, share in rec["data_mix"].items())
    rate_rows = ["| measure | base model |", "|---|---:|"]
    rate_rows += [f"| {k.replace('_', ' ')} | {m[k]:.2f} |" for k in m if k not in ("videos", "seeds")]
    card = CARD.format(
        text_len=TINY_TEXT_LEN, vae_dim=TINY_VAE["base_dim"], z=TINY_VAE["z_dim"], vae_params=pipe_params["vae"],
        layers=TINY_TRANSFORMER["num_layers"],
        width=TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"],
        params=pipe_params["transformer"], te_params=pipe_params["text_encoder"], shift=TINY_SHIFT,
        frames=d.frames, height=d.height, width_px=d.width, fps=d.fps, n_train=len(world_prompts("train")),
        n_heldout=len(world_prompts("heldout")), mix=mix, seeds=m["seeds"], steps_s=d.steps, guidance=d.guidance,
        rates="\n".join(rate_rows), te_layers=TINY_TEXT_ENCODER["num_layers"], vae_text=vae_text,
        minutes_text=minutes_text, **fields,
    )  # fmt: skip
    (folder / "README.md").write_text(card)


# Stage 1 in phases: 9-frame windows (the first frame and two 4-frame chunks) learn shapes and motion cheaply;
# 17-frame windows then teach every chunk-to-chunk hand-over of a full clip, and a last phase at a decaying lower
# rate sharpens colours. The first two stop part way through their cosine schedules (``schedule`` steps long), so
# their learning rate stays high; the shipped VAE was trained so, and a longer run would make colours crisper.
VAE_PHASES = (
    dict(steps=500, schedule=4000, window=9, batch=8, lr=1e-3, kl=1e-4, fg_weight=2.0),
    dict(steps=1000, schedule=1500, window=17, batch=6, lr=1e-3, kl=1e-4, fg_weight=2.0),
    dict(steps=600, schedule=600, window=17, batch=6, lr=5e-4, kl=1e-4, fg_weight=2.0),
)


def pretrain(
    out: str,
    clips: int = 8192,
    steps: int = 4000,
    batch: int = 32,
    lr: float = 1e-3,
    drop: float = 0.1,
    seed: int = 0,
    vae: str | None = None,
) -> dict:
    """Train the tiny model from scratch and save it as a ``WanPipeline`` folder (plus README.md and
    pretrain.json) to ``out``; ``vae``: a VAE folder trained by stage 1 already, to start at stage 2. Returns
    the recorded settings and losses."""
    from diffusers import AutoencoderKLWan

    t0 = time.perf_counter()
    torch.set_flush_denormal(True)  # tiny gradients turn denormal and slow CPU kernels down tenfold
    pipe = build_tiny_pipeline(seed=seed)
    record: dict = dict(seed=seed, vae_phases=list(VAE_PHASES), data_mix=DATA_MIX, threads=torch.get_num_threads())
    if vae:
        pipe.vae = AutoencoderKLWan.from_pretrained(vae).eval()
        record["vae_from"] = str(vae)
    else:
        for i, phase in enumerate(VAE_PHASES):
            record["vae_mse"] = round(train_vae(pipe.vae, phase, seed + i, t0), 5)
        record["vae_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    t1 = time.perf_counter()
    latents, captions = encode_dataset(pipe.vae, clips, seed + 1)
    loss = train_denoiser(pipe, latents, captions, steps, batch, lr, drop, seed + 2, t0)
    record.update(
        clips=clips, steps=steps, batch=batch, lr=lr, drop=drop, loss=round(loss, 5),
        denoiser_minutes=round((time.perf_counter() - t1) / 60, 1), minutes=round((time.perf_counter() - t0) / 60, 1),
    )  # fmt: skip
    folder = Path(out)
    pipe.save_pretrained(folder)
    record["measured"] = measure(str(folder))
    (folder / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(folder)
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the model to (vpotool/assets/tiny ships it)")
    ap.add_argument("--vae", help="start from this VAE folder (trained by stage 1) instead of training one")
    ap.add_argument("--clips", type=int, default=8192, help="pretraining clips encoded for the denoiser stage")
    ap.add_argument("--steps", type=int, default=4000, help="denoiser steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--card-only", action="store_true", help="measure OUT's model again and rewrite its README.md")
    args = ap.parse_args(argv)
    from vpotool.models.loading import quiet_loading

    quiet_loading()
    if args.card_only:
        path = Path(args.out) / "pretrain.json"
        record = json.loads(path.read_text())
        record["measured"] = measure(args.out)
        path.write_text(json.dumps(record, indent=2) + "\n")
        write_card(args.out)
        print(json.dumps(record["measured"]))
        return
    record = pretrain(
        args.out, clips=args.clips, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, vae=args.vae,
    )  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
