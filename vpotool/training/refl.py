"""``train-refl``: reward-gradient fine-tuning (ReFL / DRaFT-K / VADER): sample, keep the graph only through the
last K denoising steps (or stop at a random late step and take the model's x0 prediction, as ReFL does), decode
to pixels, score with a differentiable reward and minimise ``-reward``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vpotool.config import save_config
from vpotool.errors import VpoError
from vpotool.losses import refl_loss
from vpotool.progress import progress_bar
from vpotool.prompts import load_prompts
from vpotool.rewards import check_reward_frames
from vpotool.rollout import chunking_of, generate, initial_noise
from vpotool.sampling import resolved_settings, use_settings
from vpotool.training import fsdp
from vpotool.training.common import batch_indices, finish_step, grad_sync, optimizer_step, setup
from vpotool.training.config import ReflConfig
from vpotool.training.reward import frame_index, load_rollout_reward, reward_values, selected_fps


def refl_rollout(backend, prompts: list[str], seeds: list[int], settings: dict, cfg: ReflConfig, gen) -> torch.Tensor:
    """Sample with the gradient window of ``cfg`` and decode the frames the reward sees (``cfg.reward_frames``, see
    :func:`decode_for_reward`) -> ``[B, T', 3, H, W]`` with the graph."""
    steps = settings["steps"]
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = initial_noise(backend, shape, seeds)
    cond = backend.condition(prompts)
    uncond = backend.encode_negative(len(prompts)) if settings["guidance"] != 1.0 else None
    k = min(cfg.backprop_steps, steps)
    if cfg.backprop_mode == "last":
        window, stop = range(steps - k, steps), None
    else:  # ReFL: stop at a random step of the last half and use the model's x0 prediction there
        stop = int(torch.randint(steps // 2, steps, (1,), generator=gen))
        window = range(max(stop - k + 1, 0), stop + 1)
    if stop is not None and chunking_of(backend) is not None:
        raise VpoError(f"--backprop-mode random stops a bidirectional sample part way; --model "
                       f"{backend.info.name} rolls out chunk by chunk: use --backprop-mode last")  # fmt: skip
    # an autoregressive model's own rollout: every chunk keeps its last K steps' graph, its context detached
    traj = generate(backend, cond, noise, steps=steps, guidance=settings["guidance"], uncond=uncond,
                    grad_steps=window, stop_at=stop)  # fmt: skip
    return decode_for_reward(backend, traj.latents, settings, getattr(cfg, "reward_frames", "all"))


def decode_for_reward(backend, latents: torch.Tensor, settings: dict, spec: str) -> torch.Tensor:
    """The frames of ``spec`` (``--reward-frames``) decoded from ``latents``. A codec whose decode is causal
    (``causal_decode``: pixel frame t depends on the latent frames up to its own, as Wan's VAE decodes them one after
    the other) decodes only the latent frames up to the last frame the reward sees, so the decode's graph covers
    that prefix: ``--reward-frames 1`` (the first frame) decodes one latent frame, as VADER decodes one frame.
    Other codecs decode every frame and keep the reward's."""
    t, keep = settings["frames"], frame_index(settings["frames"], spec)
    codec = getattr(backend, "codec", None)
    if spec != "all" and getattr(codec, "causal_decode", False):
        last = max(keep)  # pixel frame 0 comes from latent frame 0, then temporal_factor frames per latent frame
        latents = latents[:, :, : (0 if last == 0 else (last - 1) // codec.temporal_factor + 1) + 1]
    frames = backend.decode(latents.to(backend.dtype))[:, :t, :, : settings["height"], : settings["width"]]
    return frames if spec == "all" else frames[:, keep]


def enable_vae_checkpointing(backend) -> None:
    """Recompute the VAE decoder's blocks in the backward pass (``--vae-checkpointing``), so that one block's
    activations are alive at a time instead of the whole decode's. Checkpointing the decode as one call would save
    nothing at the peak: the backward pass recomputes all of it while the denoiser's activations are still held.
    A VAE without block checkpointing (Wan's causal VAE, Open-Sora's) is refused in one line."""
    vae = getattr(backend.codec, "vae", None)
    if not getattr(vae, "_supports_gradient_checkpointing", False):
        kind = type(vae).__name__
        raise VpoError(
            f"--vae-checkpointing: {kind} ({backend.info.name}) cannot recompute its blocks; drop the flag, or let "
            "the reward see fewer frames (--reward-frames) or a smaller size"
        )
    vae.enable_gradient_checkpointing()


def refl_backward(trainer, cfg: ReflConfig, reward, batch: list[str], seeds: list[int], settings: dict, gen):
    """One micro-batch's rollout, reward and backward pass (the loss divided over ``cfg.grad_accum``). Returns
    ``(reward values, loss)``."""
    frames = refl_rollout(trainer.backend, batch, seeds, settings, cfg, gen)  # the frames the reward sees
    fps = selected_fps(settings["fps"], settings["frames"], cfg.reward_frames)
    value = reward_values(reward, frames, batch, cfg, fps)
    loss = refl_loss(value, cfg.reward_target)
    trainer.accelerator.backward(loss / cfg.grad_accum)
    return value, loss


def refl_step(trainer, cfg: ReflConfig, reward, prompts: list[str], settings: dict, step: int):
    """One optimizer step from step ``step``: ``cfg.grad_accum`` micro-batches of reward-gradient rollouts over
    ``prompts``. Returns ``(metrics, grad_norm)``."""
    world, rank = trainer.data_parallel
    t0, rewards, losses = time.perf_counter(), [], []
    for micro in range(cfg.grad_accum):
        slot = (step * cfg.grad_accum + micro) * world + rank
        idx = batch_indices(len(prompts), cfg.batch_size, slot, cfg.seed)
        seeds = [cfg.seed * 1_000_003 + slot * cfg.batch_size + j for j in range(len(idx))]
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + slot)
        batch = [prompts[i] for i in idx]
        with grad_sync(trainer, last=micro == cfg.grad_accum - 1):
            value, loss = refl_backward(trainer, cfg, reward, batch, seeds, settings, gen)
        rewards.append(value.detach().mean())
        losses.append(loss.detach())
    grad_norm = optimizer_step(trainer, cfg)
    values = {"loss": torch.stack(losses).mean().item(), "reward": torch.stack(rewards).mean().item()}
    return {**values, "step_time": time.perf_counter() - t0}, grad_norm


def train_refl(cfg: ReflConfig, backend=None, on_step=None) -> Path:
    """Train a LoRA adapter to raise a differentiable reward; writes checkpoints and metrics under ``cfg.out``."""
    # --- setup
    if cfg.backprop_mode == "random":
        why = "each process stops its rollout at its own step"
        fsdp.refuse("--backprop-mode random", why, "use --backprop-mode last")
    prompts = [p for _, p in load_prompts(cfg.prompts)]
    trainer = setup(cfg, backend, prompts=prompts)
    b, acc = trainer.backend, trainer.accelerator
    if cfg.vae_checkpointing:
        enable_vae_checkpointing(b)
    reward = load_rollout_reward(cfg, b.device, need_grad=True)
    settings = resolved_settings(cfg, b)
    seen = len(frame_index(settings["frames"], cfg.reward_frames))
    check_reward_frames(cfg.reward, seen, "each rollout, as --reward-frames keeps it,")
    use_settings(b, settings)
    save_config(cfg, Path(cfg.out) / "train-refl.yaml")

    # --- loop
    step = trainer.start_step
    with progress_bar("train-refl", total=cfg.max_steps) as advance:
        advance(step)
        while step < cfg.max_steps:
            values, grad_norm = refl_step(trainer, cfg, reward, prompts, settings, step)
            step += 1
            finish_step(trainer, cfg, step, values, grad_norm, on_step)
            advance(1)

    # --- save (the final checkpoint is written in the loop)
    acc.end_training()
    return Path(cfg.out)
