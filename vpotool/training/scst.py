"""``train-scst``: policy optimisation from rewards of the policy's own videos. Each prompt's rollouts get an
advantage against a baseline: the deterministic sample from the same noise (greedy, SCST proper), the mean of the
prompt's K samples (group-mean, GRPO style) or the mean of the others (leave-one-out). ``--estimator nft`` (the
default) and ``awm`` regress the denoiser on the rollouts' clean latents, weighted by the advantage (DiffusionNFT,
advantage-weighted matching; ``training/forward.py``); ``logp`` is REINFORCE on the stochastic sampler's step
log-probabilities (``-A * sum_t logp_t`` or the PPO-clipped ratio), with an optional KL to the base model.
Offline, the rollouts are ``score``d samples instead (``training/batches.py``)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from vpotool.config import save_config
from vpotool.errors import VpoError
from vpotool.losses import (
    chunk_advantage,
    kl_to_reference,
    normalize_advantage,
    policy_gradient_loss,
    scst_advantage,
)
from vpotool.progress import progress_bar
from vpotool.prompts import load_prompts
from vpotool.rewards import check_reward_frames
from vpotool.rollout import chunk_frames, chunking_of, generate, initial_noise, rollout_step_logp
from vpotool.sampling import resolved_settings, step_logp, use_settings
from vpotool.training.batches import Rollouts, StoredRollouts, group_baseline, load_batch, load_rollouts, load_videos
from vpotool.training.common import batch_indices, finish_step, grad_sync, optimizer_step, setup
from vpotool.training.config import ScstConfig
from vpotool.training.forward import Videos, forward_step
from vpotool.training.lora import copy_adapter, reference_mode
from vpotool.training.reward import load_rollout_reward, reward_values


def teacher_latents(backend, prompts: list[str], seeds: list[int], settings: dict) -> torch.Tensor:
    """Ground-truth clips of ``prompts`` encoded as latents, the context of teacher-forced rollouts: the tiny world
    renders them (a long clip per prompt and seed, :func:`vpotool.world.long.render_long_clip`)."""
    from vpotool.world.grammar import parse_prompt
    from vpotool.world.long import render_long_clip

    try:
        parsed = [parse_prompt(p) for p in prompts]
    except VpoError as e:
        raise VpoError(f"--context teacher needs a ground-truth clip per prompt, which the tiny world renders for its "
                       f"own prompts only ({e}); use --context own") from None  # fmt: skip
    f, h, w = settings["frames"], settings["height"], settings["width"]
    clips = torch.stack([render_long_clip(p, f, h, w, s) for p, s in zip(parsed, seeds, strict=True)])
    return backend.encode(clips.to(backend.device, backend.dtype)).float()


@torch.no_grad()
def collect(backend, reward, prompts: list[str], seeds: list[int], settings: dict, cfg: ScstConfig) -> Rollouts:
    """Sample stochastic trajectories (and, for the greedy baseline, the deterministic ones from the same noise),
    score them and compute advantages. On an autoregressive model each chunk sees the chunks the model made
    (``cfg.context`` own, Self-Forcing) or the ground truth's (teacher); ``cfg.advantage`` chunk scores each chunk
    (:func:`vpotool.rollout.chunk_frames`) and credits its steps with the reward to go on its own rollouts, with
    its own advantage beside the teacher (:func:`vpotool.losses.chunk_advantage`)."""
    k = 1 if cfg.baseline == "greedy" else cfg.group_size
    prompts = [p for p in prompts for _ in range(k)]
    seeds = [s * 101 + j for s in seeds for j in range(k)]
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = initial_noise(backend, shape, seeds)
    cond = backend.condition(prompts)
    uncond = backend.encode_negative(len(prompts)) if settings["guidance"] != 1.0 else None
    common = dict(steps=settings["steps"], guidance=settings["guidance"], uncond=uncond)
    chunking = chunking_of(backend)
    teacher = None
    if cfg.context == "teacher":  # autoregressive only (check_rollout_training)
        teacher = common["teacher"] = teacher_latents(backend, prompts, seeds, settings)
    keep = cfg.estimator == "logp"  # the forward-process estimators train on the final latents alone
    traj = generate(backend, cond, noise, noise_level=cfg.noise_level, step_seeds=seeds, keep_states=keep, **common)
    spans = chunk_frames(backend, chunking, shape[1]) if cfg.advantage == "chunk" else None

    def score(latents):
        frames = backend.decode(latents.to(backend.dtype))[:, : settings["frames"], :, : settings["height"]]
        frames = frames[..., : settings["width"]]
        video = reward_values(reward, frames, prompts, cfg, settings["fps"]).float()
        if spans is None:
            return video, None
        chunks = [reward_values(reward, frames[:, a:b], prompts, cfg, settings["fps"]).float() for a, b in spans]
        return video, torch.stack(chunks, 1)

    r, r_chunks = score(traj.latents)
    if cfg.baseline == "greedy":
        baseline, b_chunks = score(
            generate(backend, cond, noise, **common).latents
        )  # the greedy (deterministic) rollout
        # beside the teacher a chunk shapes no later chunk's context: its own advantage, not the reward to go
        to_go = teacher is None
        adv = scst_advantage(r, baseline) if spans is None else chunk_advantage(r_chunks, b_chunks, to_go)
    else:
        baseline, adv = group_baseline(r, k, cfg.baseline)
    adv = normalize_advantage(adv, cfg.adv_clip or None, scale=cfg.normalize)
    context = traj.latents if teacher is None else teacher
    return Rollouts(cond, uncond, traj.states or [], traj.logps, adv, r, baseline, context, traj.latents, k)


def policy_step(
    trainer, ro: Rollouts, sched, steps_to_train: list[int], cfg: ScstConfig, settings, scale, clipped, last=True
):
    """Recompute the trained steps' log-probabilities under the current weights and backpropagate, one denoising
    step at a time (memory of one step, not the whole trajectory). ``clipped``: the PPO-clipped ratio against
    ``ro.logps`` (rollouts from an older policy) instead of plain REINFORCE. Gradients are all-reduced across
    processes on the final step only, and only when ``last`` (the last rollout batch of the optimizer step).
    Returns the summed loss (a detached tensor)."""
    backend, denoiser = trainer.backend, trainer.denoiser
    total = 0.0
    guidance, noise_level = settings["guidance"], settings["noise_level"]
    chunking = chunking_of(backend)

    def logp_of(i):
        if chunking is not None:  # step i of the rollout, chunk-major, beside the rollout's own context
            args = (sched, i, ro.states, ro.latents, ro.cond, ro.uncond, guidance, noise_level)
            return rollout_step_logp(backend, chunking, *args)
        return step_logp(backend, sched, i, ro.states[i], ro.states[i + 1], ro.cond, ro.uncond, guidance, noise_level)

    steps = len(sched)
    for n, i in enumerate(steps_to_train):
        adv = ro.advantage if ro.advantage.ndim == 1 else ro.advantage[:, i // steps]  # per chunk: chunk-major steps
        with grad_sync(trainer, last=last and n == len(steps_to_train) - 1):
            logp, mean, std = logp_of(i)
            if clipped:
                loss = policy_gradient_loss(logp[:, None], adv, ro.logps[:, i : i + 1], cfg.clip_eps)
                loss = loss / len(steps_to_train)
            else:
                loss = policy_gradient_loss(logp[:, None], adv)
            if cfg.kl_beta:
                with torch.no_grad(), reference_mode(denoiser, "base"):
                    _, mean_ref, _ = logp_of(i)
                loss = loss + cfg.kl_beta * kl_to_reference(mean, mean_ref, std).mean()
            # accelerator.backward: the fp16 grad scaler and DeepSpeed need it; a bare backward skips them
            trainer.accelerator.backward(loss * scale)
        total = total + loss.detach()
    return total


def trained_steps(steps: int, cfg: ScstConfig, slot: int, per_chunk: int | None = None) -> list[int]:
    """The denoising steps micro-batch ``slot`` trains on, of ``steps`` (an autoregressive rollout's chunks x
    ``per_chunk``, chunk-major): ``cfg.step_window`` random, a seeded random ``cfg.train_fraction`` of them;
    high-noise, the first ``train_fraction`` of each chunk's steps (where the signal is: the near-clean last steps'
    tiny step std makes their log-probabilities dominate the gradient with noise, docs/training.md); drop-last, every
    step but each chunk's last (Flow-GRPO)."""
    per_chunk = per_chunk or steps
    n = max(1, round(cfg.train_fraction * per_chunk))
    if cfg.step_window == "high-noise":
        return [j for j in range(steps) if j % per_chunk < n]
    if cfg.step_window == "drop-last":
        return [j for j in range(steps) if j % per_chunk != per_chunk - 1 or per_chunk == 1]
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + slot)
    n = max(1, round(cfg.train_fraction * steps))
    return sorted(torch.randperm(steps, generator=gen)[:n].tolist())


def slots(trainer, cfg: ScstConfig, rnd: int) -> list[int]:
    """This process's micro-batch positions in the data stream for round ``rnd`` (one per ``cfg.grad_accum``)."""
    world, rank = trainer.data_parallel  # each context group takes one micro-batch
    return [(rnd * cfg.grad_accum + micro) * world + rank for micro in range(cfg.grad_accum)]


def as_videos(ro: Rollouts, seed: int, sampler: str | None = None) -> Videos:
    """Fresh rollouts as a forward-process micro-batch: their final latents, beside the teacher when they were;
    ``sampler`` names the frozen copy of the policy that made them (see :class:`Videos`)."""
    teacher = ro.latents if ro.latents is not ro.final else None
    return Videos(ro.final, ro.group, ro.cond, ro.advantage, ro.reward, ro.baseline, seed, teacher, sampler)


def old_adapters(cfg, reused: bool) -> tuple[str, ...]:
    """The frozen adapters ``--nft-old sampler`` needs besides the policy: ``("old",)``, the copy of the policy taken
    when rollouts are sampled, where they are trained on after the policy has moved (``reused``: several
    optimizer steps per sampling); none otherwise (one step on fresh rollouts: the old policy is the current one;
    ``score``d samples: the base model made them)."""
    return ("old",) if cfg.estimator == "nft" and cfg.nft_old == "sampler" and reused else ()


def fresh_batches(trainer, cfg: ScstConfig, reward, prompts: list[str], settings: dict, rnd: int) -> list[tuple]:
    """Round ``rnd``'s micro-batches sampled now: ``[(Rollouts, trained steps)]`` (logp) or ``[(Videos, None)]``
    (after the policy is copied into adapter ``old`` when :func:`old_adapters` says so)."""
    sampler = "old" if old_adapters(cfg, cfg.ppo_epochs > 1) else None
    if sampler:
        copy_adapter(trainer.denoiser, "default", sampler)
    batches = []
    for slot in slots(trainer, cfg, rnd):
        idx = batch_indices(len(prompts), cfg.batch_size, slot, cfg.seed)
        seeds = [cfg.seed * 1_000_003 + slot * cfg.batch_size + j for j in range(len(idx))]
        ro = collect(trainer.backend, reward, [prompts[i] for i in idx], seeds, settings, cfg)
        if cfg.estimator == "logp":
            batches.append((ro, trained_steps(ro.logps.shape[1], cfg, slot, settings["steps"])))  # chunks x steps
        else:
            batches.append((as_videos(ro, cfg.seed * 7_919 + slot, sampler), None))
    return batches


def stored_batches(trainer, cfg: ScstConfig, stored: StoredRollouts, rnd: int) -> list[tuple]:
    """Round ``rnd``'s micro-batches of stored rollouts: ``[(Rollouts, trained steps)]`` (logp: ``batch_size``
    samples) or ``[(Videos, None)]`` (``batch_size`` prompts with all their candidates)."""
    batches = []
    for slot in slots(trainer, cfg, rnd):
        if cfg.estimator != "logp":
            picked = batch_indices(len(stored.groups), cfg.batch_size, slot, cfg.seed)
            seed = cfg.seed * 7_919 + slot
            batches.append((load_videos(trainer.backend, stored, [stored.groups[i] for i in picked], cfg, seed), None))
            continue
        idx = batch_indices(len(stored.files), cfg.batch_size, slot, cfg.seed)
        ro = load_batch(trainer.backend, stored, idx, cfg)
        batches.append((ro, trained_steps(ro.logps.shape[1], cfg, slot, stored.settings["steps"])))
    return batches


def scst_update(trainer, cfg: ScstConfig, batches: list[tuple], sched, settings: dict, clipped: bool):
    """One optimizer step on ``batches`` (see :func:`policy_step`, or for the forward-process estimators
    :func:`~vpotool.training.forward.forward_step`). Returns ``(metrics, grad_norm)``."""
    scale, n = 1 / len(batches), len(batches)
    if cfg.estimator == "logp":
        losses = (policy_step(trainer, ro, sched, tr, cfg, settings, scale, clipped, last=j == n - 1)
                  for j, (ro, tr) in enumerate(batches))  # fmt: skip
    else:
        losses = (forward_step(trainer, v, cfg, scale, last=j == n - 1) for j, (v, _) in enumerate(batches))
    loss = sum(float(x) for x in losses)
    grad_norm = optimizer_step(trainer, cfg)
    values = {
        "loss": loss * scale,
        "reward": torch.cat([ro.reward for ro, _ in batches]).mean().item(),
        "baseline_reward": torch.cat([ro.baseline for ro, _ in batches]).mean().item(),
        "advantage_abs": torch.cat([ro.advantage for ro, _ in batches]).abs().mean().item(),
    }
    return values, grad_norm


def offline_step(trainer, cfg: ScstConfig, stored: StoredRollouts, step: int):
    """One optimizer step from step ``step`` on stored rollouts (round ``step // ppo_epochs`` of the data stream),
    with the clipped ratio (logp): for callers that own the loop, such as ``vpotool loop``. Returns
    ``(metrics, grad_norm)``."""
    t0 = time.perf_counter()
    check_rollout_training(trainer.backend, cfg, stored.settings)
    sched = trainer.backend.schedule(stored.settings["steps"], stored.shape)
    batches = stored_batches(trainer, cfg, stored, step // cfg.ppo_epochs)
    values, grad_norm = scst_update(trainer, cfg, batches, sched, stored.settings, clipped=True)
    return {**values, "step_time": time.perf_counter() - t0}, grad_norm


def check_rollout_training(backend, cfg: ScstConfig, settings: dict) -> None:
    """Refuse, in one line, what policy gradients on an autoregressive model cannot do: a re-noised context with
    ``--estimator logp`` (its noise is not kept, so log-probabilities could not be recomputed; the forward-process
    estimators re-noise it as DPO does), and a video that is not whole chunks; and the chunk options on a
    bidirectional model."""
    chunking = chunking_of(backend)
    if chunking is None:
        for name, plain in (("advantage", "video"), ("context", "own")):
            if getattr(cfg, name, plain) != plain:
                raise VpoError(f"--{name} {getattr(cfg, name)} needs an autoregressive model (chunks); --model "
                               f"{backend.info.name} makes every frame at once: drop the flag")  # fmt: skip
        return
    if chunking.context_noise and chunking.context_mode != "label" and cfg.estimator == "logp":
        raise VpoError(f"train-scst on --model {backend.info.name} needs a clean context; pass --model-options "
                       "addnoise=0")  # fmt: skip
    chunking.spans(backend.latent_shape(settings["frames"], settings["height"], settings["width"])[1])


def train_scst(cfg: ScstConfig, backend=None, on_step=None) -> Path:
    """Train a LoRA adapter with self-critical policy gradients; writes checkpoints and metrics under ``cfg.out``.
    With ``cfg.samples`` the rollouts are stored, scored trajectories (see :func:`load_rollouts`), not sampled."""
    # --- setup
    stored = load_rollouts(cfg.samples, cfg.scores, cfg, backend) if cfg.samples else None  # before models load
    if stored is not None:  # the stored trajectories define the reward and the sampler settings
        cfg = dataclasses.replace(cfg, reward=stored.reward_name, **stored.settings)
    else:
        prompts = [p for _, p in load_prompts(cfg.prompts)]
    extra = old_adapters(cfg, stored is None and cfg.ppo_epochs > 1)
    trainer = setup(cfg, backend, extra, prompts=stored.prompts if stored is not None else prompts)
    b, acc = trainer.backend, trainer.accelerator
    settings = resolved_settings(cfg, b)
    check_rollout_training(b, cfg, settings)
    if stored is None:
        check_reward_frames(cfg.reward, settings["frames"], "each rollout")
    use_settings(b, settings if stored is None else stored.video)
    if stored is None:
        reward = load_rollout_reward(cfg, b.device, need_grad=False)
        shape = b.latent_shape(settings["frames"], settings["height"], settings["width"])
    else:
        shape = stored.shape
        for note in stored.notes:
            acc.print(f"warning: {note}", file=sys.stderr)
    sched = b.schedule(settings["steps"], shape)
    save_config(cfg, Path(cfg.out) / "train-scst.yaml")
    clipped = cfg.ppo_epochs > 1 or stored is not None  # stored trajectories are off-policy after the first update

    # --- loop: a round samples (offline: loads) rollouts, then takes ppo_epochs optimizer steps on them
    step = trainer.start_step
    with progress_bar("train-scst", total=cfg.max_steps) as advance:
        advance(step)
        while step < cfg.max_steps:
            rnd, t0 = step // cfg.ppo_epochs, time.perf_counter()
            if stored is None:
                batches = fresh_batches(trainer, cfg, reward, prompts, settings, rnd)
            else:
                batches = stored_batches(trainer, cfg, stored, rnd)
            for _ in range(cfg.ppo_epochs):
                values, grad_norm = scst_update(trainer, cfg, batches, sched, settings, clipped)
                step += 1
                values["step_time"] = time.perf_counter() - t0
                finish_step(trainer, cfg, step, values, grad_norm, on_step, extra)
                advance(1)
                if step >= cfg.max_steps:
                    break

    # --- save (the final checkpoint is written in the loop)
    acc.end_training()
    return Path(cfg.out)
