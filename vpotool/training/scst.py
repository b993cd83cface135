"""``train-scst``: self-critical policy gradients for diffusion. Stochastic rollouts record each step's
log-probability; the baseline is the deterministic sample from the same noise (greedy, SCST) or the mean of K
samples of the prompt (group-mean, GRPO style); the loss is ``-A * sum_t logp_t`` (or the PPO-clipped ratio
over several epochs), with an optional KL to the base model on the step means."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vpotool.config import ScstConfig, save_config
from vpotool.losses import group_advantage, kl_to_reference, normalize_advantage, policy_gradient_loss, scst_advantage
from vpotool.sampling import sample, seeded_noise, step_logp
from vpotool.stages.common import load_prompts, progress_bar
from vpotool.stages.sample import resolved_settings
from vpotool.training.common import finish_step, optimizer_step, setup
from vpotool.training.dpo import batch_indices, reference_mode
from vpotool.training.refl import load_rollout_reward


@dataclass
class Rollouts:
    """One micro-batch of stochastic trajectories: ``states`` S + 1 tensors ``[B, C, F, h, w]``, ``logps [B, S]``
    at sampling time, ``advantage [B]`` and the rewards for logging."""

    cond: dict
    uncond: dict | None
    states: list[torch.Tensor]
    logps: torch.Tensor
    advantage: torch.Tensor
    reward: torch.Tensor
    baseline: torch.Tensor


@torch.no_grad()
def collect(backend, reward, prompts: list[str], seeds: list[int], settings: dict, cfg: ScstConfig) -> Rollouts:
    """Sample stochastic trajectories (and, for the greedy baseline, the deterministic ones from the same noise),
    score them and compute advantages."""
    k = cfg.group_size if cfg.baseline == "group-mean" else 1
    prompts = [p for p in prompts for _ in range(k)]
    seeds = [s * 101 + j for s in seeds for j in range(k)]
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = seeded_noise(shape, seeds, backend.device)
    cond = backend.encode_prompts(prompts)
    uncond = backend.encode_negative(len(prompts)) if settings["guidance"] != 1.0 else None
    common = dict(steps=settings["steps"], guidance=settings["guidance"], uncond=uncond)
    traj = sample(backend, cond, noise, noise_level=cfg.noise_level, step_seeds=seeds, keep_states=True, **common)

    def score(latents):
        frames = backend.decode(latents.to(backend.dtype))[:, : settings["frames"], :, : settings["height"]]
        return reward(frames[..., : settings["width"]].float(), prompts)[cfg.reward_dimension].float()

    r = score(traj.latents)
    if cfg.baseline == "greedy":
        baseline = score(sample(backend, cond, noise, **common).latents)
        adv = scst_advantage(r, baseline)
    else:
        baseline = r.view(-1, k).mean(1).repeat_interleave(k)
        adv = group_advantage(r, k)
    adv = normalize_advantage(adv, cfg.adv_clip or None, scale=cfg.normalize)
    return Rollouts(cond, uncond, traj.states, traj.logps, adv, r, baseline)


def policy_step(backend, denoiser, ro: Rollouts, sched, steps_to_train: list[int], cfg: ScstConfig, settings, scale):
    """Recompute the trained steps' log-probabilities under the current weights and backpropagate, one denoising
    step at a time (memory of one step, not the whole trajectory). Returns the summed loss value."""
    total = 0.0
    for i in steps_to_train:
        x, x_next = ro.states[i], ro.states[i + 1]
        logp, mean, std = step_logp(
            backend, sched, i, x, x_next, ro.cond, ro.uncond, settings["guidance"], cfg.noise_level
        )
        if cfg.ppo_epochs == 1:
            loss = policy_gradient_loss(logp[:, None], ro.advantage)
        else:
            loss = policy_gradient_loss(logp[:, None], ro.advantage, ro.logps[:, i : i + 1], cfg.clip_eps)
            loss = loss / len(steps_to_train)
        if cfg.kl_beta:
            with torch.no_grad(), reference_mode(denoiser, "base"):
                _, mean_ref, _ = step_logp(
                    backend, sched, i, x, x_next, ro.cond, ro.uncond, settings["guidance"], cfg.noise_level
                )
            loss = loss + cfg.kl_beta * kl_to_reference(mean, mean_ref, std).mean()
        (loss * scale).backward()
        total += loss.item()
    return total


def train_scst(cfg: ScstConfig, backend=None, on_step=None) -> Path:
    """Train a LoRA adapter with self-critical policy gradients; writes checkpoints and metrics under ``cfg.out``."""
    # --- setup
    prompts = [p for _, p in load_prompts(cfg.prompts)]
    trainer = setup(cfg, backend)
    b, acc = trainer.backend, trainer.accelerator
    reward = load_rollout_reward(cfg, b.device, need_grad=False)
    settings = resolved_settings(cfg, b)
    shape = b.latent_shape(settings["frames"], settings["height"], settings["width"])
    sched = b.schedule(settings["steps"], shape)
    save_config(cfg, Path(cfg.out) / "train-scst.yaml")
    world, rank = acc.num_processes, acc.process_index
    n_train = max(1, round(cfg.train_fraction * settings["steps"]))

    # --- loop: a round collects rollouts, then takes ppo_epochs optimizer steps on them
    step = trainer.start_step
    with progress_bar("train-scst", total=cfg.max_steps) as advance:
        advance(step)
        while step < cfg.max_steps:
            rnd, t0 = step // cfg.ppo_epochs, time.perf_counter()
            batches = []
            for micro in range(cfg.grad_accum):
                slot = (rnd * cfg.grad_accum + micro) * world + rank
                idx = batch_indices(len(prompts), cfg.batch_size, slot, cfg.seed)
                seeds = [cfg.seed * 1_000_003 + slot * cfg.batch_size + j for j in range(len(idx))]
                gen = torch.Generator().manual_seed(cfg.seed * 7_919 + slot)
                trained = sorted(torch.randperm(settings["steps"], generator=gen)[:n_train].tolist())
                batches.append((collect(b, reward, [prompts[i] for i in idx], seeds, settings, cfg), trained))
            for _ in range(cfg.ppo_epochs):
                loss = sum(policy_step(b, trainer.denoiser, ro, sched, tr, cfg, settings, 1 / cfg.grad_accum)
                           for ro, tr in batches)  # fmt: skip
                grad_norm = optimizer_step(trainer, cfg)
                step += 1
                values = {
                    "loss": loss / cfg.grad_accum,
                    "reward": torch.cat([ro.reward for ro, _ in batches]).mean().item(),
                    "baseline_reward": torch.cat([ro.baseline for ro, _ in batches]).mean().item(),
                    "advantage_abs": torch.cat([ro.advantage for ro, _ in batches]).abs().mean().item(),
                    "step_time": time.perf_counter() - t0,
                }
                finish_step(trainer, cfg, step, values, grad_norm, on_step)
                advance(1)
                if step >= cfg.max_steps:
                    break

    # --- save (the final checkpoint is written in the loop)
    acc.end_training()
    return Path(cfg.out)
