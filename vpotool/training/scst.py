"""``train-scst``: self-critical policy gradients for diffusion. Stochastic rollouts record each step's
log-probability; the baseline is the deterministic sample from the same noise (greedy, SCST) or the mean of K
samples of the prompt (group-mean, GRPO style); the loss is ``-A * sum_t logp_t`` (or the PPO-clipped ratio
over several epochs), with an optional KL to the base model on the step means. Offline, the rollouts are stored
trajectories of ``sample --save-trajectory`` with their ``score`` rewards instead."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vpotool.config import flag, save_config
from vpotool.errors import VpoError
from vpotool.latents import load_latents
from vpotool.losses import (
    chunk_advantage,
    group_advantage,
    kl_to_reference,
    leave_one_out_advantage,
    normalize_advantage,
    policy_gradient_loss,
    scst_advantage,
)
from vpotool.manifest import manifest_config, read_manifest, resolve, reward_rows
from vpotool.models.base import latent_channels
from vpotool.progress import progress_bar
from vpotool.prompts import load_prompts
from vpotool.rewards import check_reward_frames
from vpotool.rollout import check_chunking, chunk_frames, chunking_of, generate, rollout_step_logp
from vpotool.sampling import resolved_settings, seeded_noise, step_logp, use_settings
from vpotool.training.common import batch_indices, finish_step, grad_sync, optimizer_step, setup
from vpotool.training.config import ScstConfig
from vpotool.training.forward import Videos, forward_step
from vpotool.training.lora import reference_mode
from vpotool.training.reward import load_rollout_reward, reward_values


@dataclass
class Rollouts:
    """One micro-batch of stochastic trajectories: ``states`` S + 1 tensors ``[B, C, F, h, w]``, ``logps [B, S]``
    at sampling time, ``advantage [B]`` and the rewards for logging (fresh from :func:`collect`, or stored ones
    from :func:`load_batch`)."""

    cond: dict
    uncond: dict | None
    states: list[torch.Tensor]  # empty for the forward-process estimators, which need no trajectory
    logps: torch.Tensor | None
    advantage: torch.Tensor  # [B], or [B, chunks] (per-chunk advantages of an autoregressive rollout)
    reward: torch.Tensor
    baseline: torch.Tensor
    latents: torch.Tensor | None = None  # an autoregressive rollout's context: its own final latents, or the teacher
    final: torch.Tensor | None = None  # the rollouts' own final latents [B, C, F, h, w]
    group: int = 1  # a prompt's candidates, adjacent


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
    (:func:`vpotool.rollout.chunk_frames`) and credits its steps with the reward to go
    (:func:`vpotool.losses.chunk_advantage`)."""
    k = 1 if cfg.baseline == "greedy" else cfg.group_size
    prompts = [p for p in prompts for _ in range(k)]
    seeds = [s * 101 + j for s in seeds for j in range(k)]
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = seeded_noise(shape, seeds, backend.device)
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
        adv = scst_advantage(r, baseline) if spans is None else chunk_advantage(r_chunks, b_chunks)
    else:
        baseline, adv = group_baseline(r, k, cfg.baseline)
    adv = normalize_advantage(adv, cfg.adv_clip or None, scale=cfg.normalize)
    context = traj.latents if teacher is None else teacher
    return Rollouts(cond, uncond, traj.states or [], traj.logps, adv, r, baseline, context, traj.latents, k)


def group_baseline(reward: torch.Tensor, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(baseline, advantage)``, both ``[B]``, of ``reward [B]`` in adjacent groups of ``k``: group-mean (GRPO's
    ``(R - mean) / std``) or leave-one-out (``R_i - mean_{j != i} R_j``)."""
    if kind == "leave-one-out":
        adv = leave_one_out_advantage(reward, k)
        return reward - adv, adv
    return reward.view(-1, k).mean(1).repeat_interleave(k), group_advantage(reward, k)


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


@dataclass
class StoredRollouts:
    """Scored trajectories of ``sample --save-trajectory`` for offline training, one entry per usable sample
    (a prompt's candidates adjacent, ``groups`` their indices): latent ``files`` holding ``states``/``logps`` (the
    forward-process estimators read their final ``latents`` only), ``prompts``, ``reward [N]``, the ``baseline [N]``
    and ``advantage [N]`` of ``--baseline`` (group-mean: normalised by the group's std). ``settings`` are the sampler
    settings the trajectories were made with, ``video`` the ``frames`` and ``fps`` ``sample`` was asked for (what
    the denoiser was conditioned on, see :func:`~vpotool.sampling.use_settings`), ``shape`` their latent
    ``[C, F, h, w]``, ``notes`` warnings."""

    reward_name: str
    files: list[Path]
    prompts: list[str]
    reward: torch.Tensor
    baseline: torch.Tensor
    advantage: torch.Tensor
    settings: dict
    video: dict
    shape: tuple[int, ...]
    notes: list[str]
    groups: list[list[int]] = dataclasses.field(default_factory=list)  # each prompt's candidates (indices)


def trajectory_shape(files: list[Path], steps: int | None) -> tuple[int, ...]:
    """Check, from the file headers only, that every latent file holds a trajectory of ``steps`` steps
    (``states [steps + 1, C, F, h, w]``, ``logps [steps]``, or ``[chunks * steps]`` for an autoregressive rollout),
    or, with ``steps`` None (the forward-process estimators), final ``latents [C, F, h, w]``; returns the latent
    shape ``[C, F, h, w]``."""
    from safetensors import safe_open

    shapes = set()
    for path in files:
        if not path.is_file():
            raise VpoError(f"latent file not found: {path}; keep the samples manifest inside its run folder")
        try:
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
                states = tuple(f.get_slice("states").get_shape()) if "states" in keys else None
                logps = tuple(f.get_slice("logps").get_shape()) if "logps" in keys else None
                final = tuple(f.get_slice("latents").get_shape()) if "latents" in keys else None
        except Exception as e:  # noqa: BLE001 (any damage means the same thing to the user)
            raise VpoError(f"{path} is not a readable latent file ({e}); rerun `vpotool sample`") from e
        if steps is None:
            if final is None:
                raise VpoError(f"{path} holds no 'latents'; rerun `vpotool sample` on its --out to rewrite it")
            shapes.add(final)
            continue
        if states is None or logps is None:
            raise VpoError(
                f"{path} holds no stored trajectory (no 'states'); rerun `vpotool sample` with --save-trajectory "
                f"and --noise-level > 0 (e.g. 0.7) to train on its samples offline"
            )
        # an autoregressive rollout records each chunk's steps: chunks x steps log-probabilities
        if states[0] != steps + 1 or len(logps) != 1 or logps[0] % steps or not logps[0]:
            raise VpoError(
                f"{path} holds a trajectory of {logps[0]} steps, but its manifest row says {steps}; "
                f"rerun `vpotool sample` into a new --out"
            )
        shapes.add(states[1:])
    if len(shapes) != 1:
        raise VpoError(f"stored trajectories have different shapes {sorted(shapes)}; train one size at a time")
    return next(iter(shapes))


def load_rollouts(samples: str | Path, scores: str | Path, cfg: ScstConfig, backend=None) -> StoredRollouts:
    """Join a samples manifest with its scores of one reward (``cfg.reward``, or the only one) and
    ``cfg.reward_dimension`` into stored rollouts; reads manifests and latent file headers only. The baseline of a
    sample is the mean reward of its prompt's scored candidates. Refuses, one line each: samples of another
    ``--model`` (or, given ``backend``, latents it cannot take), non-finite scores, latent files without a
    trajectory, mixed sampler settings; skips prompts with fewer than 2 scored candidates."""
    samples_path, scores_path = Path(samples), Path(scores)
    table = read_manifest(samples_path, "samples", "--samples")
    samples = {r["sample_id"]: r for r in table.to_pylist()}
    scores = read_manifest(scores_path, "scores", "--scores").to_pylist()
    reward_name, rows = reward_rows(scores, cfg.reward, cfg.reward_dimension, scores_path, "--reward-dimension")
    groups: dict[str, list[tuple[dict, float]]] = {}
    for r in rows:
        sid, value = r["sample_id"], r[cfg.reward_dimension]
        if value is None or not math.isfinite(value):
            raise VpoError(
                f"{scores_path}: sample {sid} has a non-finite {cfg.reward_dimension} score ({value}); "
                f"rescore it with `vpotool score` or drop its row"
            )
        if sid not in samples:
            raise VpoError(
                f"{scores_path} scores sample {sid}, which is not in {samples_path}; pass the samples "
                f"manifest these scores were made from"
            )
        made_by = samples[sid]["model"]
        if made_by != cfg.model:
            raise VpoError(
                f"{samples_path}: sample {sid} was made by --model {made_by}, not {cfg.model}; "
                f"train with --model {made_by} (stored log-probabilities are that model's)"
            )
        groups.setdefault(r["prompt_id"], []).append((samples[sid], value))
    notes = []
    few = sorted(p for p, g in groups.items() if len(g) < 2)
    if len(few) == len(groups):
        raise VpoError(
            f"no prompt in {scores_path} has 2 or more scored candidates, which the group-mean "
            f"baseline needs; sample with --candidates 2 or more and score every candidate"
        )
    if few:
        notes.append(f"skipping {len(few)} prompt(s) with fewer than 2 scored candidates: {', '.join(few)}")
    kept = [sorted(groups[p], key=lambda sv: sv[0]["sample_id"]) for p in sorted(groups) if len(groups[p]) >= 2]
    used = [s for g in kept for s, _ in g]

    settings = {}
    for k in ("steps", "guidance", "noise_level", "frames", "height", "width"):
        values = sorted({s[k] for s in used})
        if len(values) > 1:
            raise VpoError(
                f"{samples_path}: samples were made with different {k} ({', '.join(map(str, values))}); "
                f"train on the samples of one setting at a time"
            )
        settings[k] = values[0]
    asked = manifest_config(table)  # what `sample` was asked for: the rows hold the frames the VAE gave
    if backend is not None:  # trajectories of another rollout (or of a bidirectional model) recompute wrongly
        check_chunking(asked.get("chunking"), backend, str(samples_path))
    fps = sorted({s["fps"] for s in used})
    if len(fps) > 1:
        raise VpoError(f"{samples_path}: samples were made at different fps ({', '.join(map(str, fps))}); "
                       "train on the samples of one setting at a time")  # fmt: skip
    video = {"frames": asked.get("frames") or settings["frames"], "fps": fps[0]}
    for k, v in settings.items():
        given = getattr(cfg, k)
        if given is not None and given not in (v, asked.get(k)):
            notes.append(f"{flag(k)} {given} is ignored: the stored trajectories were sampled with {k} {v}")
    adapters = sorted({s["adapter"] for s in used if s["adapter"]})
    if adapters:
        notes.append(
            f"the samples were drawn with adapter {', '.join(adapters)}, but training starts a new adapter "
            f"on the base model: their log-probabilities are off-policy from the first step"
        )

    files = [resolve(samples_path, s["latent"]) for s in used]
    shape = trajectory_shape(files, settings["steps"] if cfg.estimator == "logp" else None)
    if backend is not None and shape[0] != latent_channels(backend):
        raise VpoError(
            f"{samples_path}: latents have {shape[0]} channels, --model {backend.info.name} expects "
            f"{latent_channels(backend)}; were these samples made with other weights?"
        )
    values = [torch.tensor([v for _, v in g], dtype=torch.float32) for g in kept]
    reward = torch.cat(values)
    parts = [group_baseline(v, len(v), cfg.baseline) for v in values]
    baseline, advantage = torch.cat([b for b, _ in parts]), torch.cat([a for _, a in parts])
    prompts = [s["prompt"] for s in used]
    bounds = torch.tensor([0] + [len(v) for v in values]).cumsum(0).tolist()
    groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    return StoredRollouts(
        reward_name, files, prompts, reward, baseline, advantage, settings, video, shape, notes, groups
    )


@torch.no_grad()
def load_batch(backend, stored: StoredRollouts, idx: list[int], cfg: ScstConfig) -> Rollouts:
    """The stored rollouts ``idx`` as one micro-batch: trajectories read from their files now (the set need not
    fit in memory), conditioning encoded from their prompts, advantages normalised over the batch as online."""
    from safetensors import safe_open

    states, logps = [], []
    for i in idx:
        with safe_open(str(stored.files[i]), "pt") as f:
            states.append(f.get_tensor("states").float())
            logps.append(f.get_tensor("logps").float())
    dev = backend.device
    cond = backend.condition([stored.prompts[i] for i in idx])
    uncond = backend.encode_negative(len(idx)) if stored.settings["guidance"] != 1.0 else None
    adv = normalize_advantage(stored.advantage[idx], cfg.adv_clip or None, scale=cfg.normalize).to(dev)
    visited = list(torch.stack(states, 1).to(dev).unbind(0))  # S + 1 tensors [B, C, F, h, w]
    logps = torch.stack(logps).to(dev)
    chunking = chunking_of(backend)
    if chunking is not None and logps.shape[1] != len(chunking.spans(visited[0].shape[2])) * (len(visited) - 1):
        raise VpoError(f"{stored.files[idx[0]]} holds {logps.shape[1]} step log-probabilities, not one per chunk and "
                       f"step of --model {backend.info.name}'s rollout; rerun `vpotool sample`")  # fmt: skip
    latents = visited[-1]  # the final state: an autoregressive rollout's context
    return Rollouts(cond, uncond, visited, logps, adv, stored.reward[idx], stored.baseline[idx], latents)


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
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    return [(rnd * cfg.grad_accum + micro) * world + rank for micro in range(cfg.grad_accum)]


def as_videos(ro: Rollouts, seed: int) -> Videos:
    """Fresh rollouts as a forward-process micro-batch: their final latents, beside the teacher when they were."""
    teacher = ro.latents if ro.latents is not ro.final else None
    return Videos(ro.final, ro.group, ro.cond, ro.advantage, ro.reward, ro.baseline, seed, teacher)


def fresh_batches(trainer, cfg: ScstConfig, reward, prompts: list[str], settings: dict, rnd: int) -> list[tuple]:
    """Round ``rnd``'s micro-batches sampled now: ``[(Rollouts, trained steps)]`` (logp) or ``[(Videos, None)]``."""
    batches = []
    for slot in slots(trainer, cfg, rnd):
        idx = batch_indices(len(prompts), cfg.batch_size, slot, cfg.seed)
        seeds = [cfg.seed * 1_000_003 + slot * cfg.batch_size + j for j in range(len(idx))]
        ro = collect(trainer.backend, reward, [prompts[i] for i in idx], seeds, settings, cfg)
        if cfg.estimator == "logp":
            batches.append((ro, trained_steps(ro.logps.shape[1], cfg, slot, settings["steps"])))  # chunks x steps
        else:
            batches.append((as_videos(ro, cfg.seed * 7_919 + slot), None))
    return batches


@torch.no_grad()
def load_videos(backend, stored: StoredRollouts, groups: list[list[int]], cfg: ScstConfig, seed: int) -> Videos:
    """The stored samples of ``groups`` (each a prompt's candidates) as one forward-process micro-batch: their final
    latents read now, advantages normalised over the batch as online. Groups of unequal size do not share noise."""
    idx = [i for g in groups for i in g]
    latents = load_latents([stored.files[i] for i in idx]).to(backend.device)
    sizes = {len(g) for g in groups}
    group = sizes.pop() if len(sizes) == 1 else 1
    adv = normalize_advantage(stored.advantage[idx], cfg.adv_clip or None, scale=cfg.normalize).to(backend.device)
    cond = backend.condition([stored.prompts[i] for i in idx])
    return Videos(latents, group, cond, adv, stored.reward[idx], stored.baseline[idx], seed)


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
    if chunking.context_noise and cfg.estimator == "logp":
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
    trainer = setup(cfg, backend, prompts=stored.prompts if stored is not None else prompts)
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
                finish_step(trainer, cfg, step, values, grad_norm, on_step)
                advance(1)
                if step >= cfg.max_steps:
                    break

    # --- save (the final checkpoint is written in the loop)
    acc.end_training()
    return Path(cfg.out)
