"""The micro-batches ``train-scst`` learns from: fresh stochastic rollouts (:class:`Rollouts`, made by
``scst.collect``) and stored ones, the scored samples of ``sample`` read back for offline training
(:func:`load_rollouts`, then :func:`load_batch` for the log-prob estimator or :func:`load_videos` for the
forward-process ones), with the group baselines both use."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vpotool.config import flag
from vpotool.errors import VpoError
from vpotool.latents import load_latents
from vpotool.losses import group_advantage, leave_one_out_advantage, normalize_advantage
from vpotool.manifest import manifest_config, read_manifest, resolve, reward_rows
from vpotool.models.base import latent_channels
from vpotool.rollout import check_chunking, chunking_of
from vpotool.training.config import ScstConfig
from vpotool.training.forward import Videos


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


def group_baseline(reward: torch.Tensor, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(baseline, advantage)``, both ``[B]``, of ``reward [B]`` in adjacent groups of ``k``: group-mean (GRPO's
    ``(R - mean) / std``) or leave-one-out (``R_i - mean_{j != i} R_j``)."""
    if kind == "leave-one-out":
        adv = leave_one_out_advantage(reward, k)
        return reward - adv, adv
    return reward.view(-1, k).mean(1).repeat_interleave(k), group_advantage(reward, k)


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
    # the frozen policy that made them (see Videos.sampler): the base model for `sample`'s, which starts no adapter;
    # `vpotool loop` sets "old", its copy of the policy that sampled the iteration
    sampler: str = "base"


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
    return Videos(latents, group, cond, adv, stored.reward[idx], stored.baseline[idx], seed, sampler=stored.sampler)
