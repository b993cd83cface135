"""Autoregressive rollouts: a video made chunk by chunk, each chunk denoised while it sees the chunks before it.

A chunk-causal family (SkyReels-V2 Diffusion Forcing, the built-in ``tiny-ar``, Self-Forcing) takes a window of
latent frames with a timestep per frame. The rollout feeds it the last ``context`` latent frames it generated itself
(clean, or re-noised to ``context_noise``, as SkyReels' ``addnoise_condition`` does) beside the chunk being
denoised, and keeps the model's output for the chunk alone. The first chunk has no context; later chunks see at
most ``context`` frames, so memory is bounded by the window, whatever the video's length.

The steps inside a chunk are vpotool's sampler steps (:mod:`vpotool.sampling`): deterministic (the greedy rollout
SCST compares with) or stochastic with a log-probability per (chunk, step), the Gaussian transition that
policy-gradient training needs; or, with ``scheduler``, a diffusers scheduler stepped as the family's pipeline
steps it. Stages and trainers call :func:`rollout` and never loop over chunks themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Backend, Chunking, Conditioning, NoiseSchedule, decoded_frames, noise_like
from vpotool.sampling import (
    Trajectory,
    _step_stream,
    gaussian_logp,
    guided_prediction,
    sample,
    sample_with_scheduler,
    seeded_noise,
    step_moments,
    training_target,
)


def chunking_of(backend) -> Chunking | None:
    """The backend's :class:`Chunking` when it is autoregressive, else None (bidirectional: all frames at once)."""
    return getattr(backend, "chunking", None)


def initial_noise(backend, shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """The starting noise ``[len(seeds), *shape]`` of each seed's video: frame by frame for an autoregressive
    family, so that the same seed at more frames extends the shorter video (its first chunks equal); all at once
    for a bidirectional one, whose every frame depends on the length anyway."""
    return seeded_noise(shape, seeds, backend.device, frame_major=chunking_of(backend) is not None)


def check_chunking(recorded: dict | None, backend, what: str) -> None:
    """Refuse, in one line, inputs made by a rollout other than ``backend``'s: ``recorded`` is the chunking a
    manifest holds (None or {} for a bidirectional one)."""
    mine = chunking_of(backend)
    have = Chunking.from_dict(recorded) if recorded else None
    if have == mine:
        return
    kind = lambda c: f"autoregressive ({c.as_dict()})" if c else "bidirectional"  # noqa: E731
    raise VpoError(
        f"{what} was made by a {kind(have)} rollout, but --model {backend.info.name} samples {kind(mine)}; "
        f"use the model (and --model-options) that made it"
    )


def window_input(ctx: torch.Tensor, x: torch.Tensor, t, sigma: float, z: torch.Tensor | None = None):
    """What the model sees for one chunk: its context frames ``ctx [B, C, n, h, w]`` (re-noised along the flow to
    ``sigma`` with noise ``z`` shaped like them, when ``sigma > 0`` and ``z`` is given) before the chunk's noised
    latents ``x``, and a
    timestep per frame, ``sigma * 1000`` for the context and ``t`` (a number or ``[B]``) for the chunk:
    ``(x_in [B, C, n + f, h, w], t [B, n + f])``. Shared by :func:`rollout` and the training-time recomputations."""
    if sigma and ctx.shape[2] and z is not None:  # without z the context is clean, only labelled with sigma
        ctx = (1 - sigma) * ctx + sigma * z.to(ctx)
    b, n, f = x.shape[0], ctx.shape[2], x.shape[2]
    t_chunk = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(b, f)
    t_ctx = torch.full((b, n), sigma * 1000.0, device=x.device)
    return torch.cat([ctx.to(x.dtype), x], 2), torch.cat([t_ctx, t_chunk], 1)


def rollout(
    backend: Backend,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    chunking: Chunking,
    steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    noise_level: float = 0.0,
    step_seeds: Sequence[int] | None = None,
    grad_steps: Sequence[int] = (),
    keep_states: bool = False,
    schedule: NoiseSchedule | None = None,
    scheduler=None,
    teacher: torch.Tensor | None = None,
) -> Trajectory:
    """Generate ``noise [B, C, F, h, w]`` chunk by chunk (:class:`Chunking`); chunk k starts from its frames of
    ``noise``.

    Each chunk takes ``steps`` sampler steps with the arguments of :func:`vpotool.sampling.sample`:
    ``noise_level > 0`` makes them stochastic and records ``logps [B, chunks * steps]`` (chunk-major);
    ``step_seeds`` make the step noise (and context noise) reproducible; steps whose index (within a chunk) is in
    ``grad_steps`` keep the graph through that chunk's denoising, while the context is always detached (the model
    sees its earlier chunks as data). ``keep_states`` keeps ``steps + 1`` states shaped like ``noise``, whose frames
    of chunk k are that chunk's states. ``scheduler``: a diffusers scheduler, copied per chunk and stepped on the
    chunk, as the family's pipeline samples (no log-probabilities; one whose ``step`` takes a ``generator``, such as
    Self-Forcing's re-noising sampler, gets each video's seeded stream). ``teacher``: latents shaped like ``noise``
    whose frames are the context instead of the rollout's own (teacher forcing, as the model was trained; a clip made
    so shows what the model does without exposure bias).
    """
    import copy
    import inspect

    if backend.prediction != "flow":
        raise VpoError(f"autoregressive rollouts need a flow-matching model; --model {backend.info.name} is not")
    if chunking.ar_step:  # SkyReels-V2's asynchronous mode: a schedule staggered over the chunk's frames
        from vpotool.diffusion_forcing import staggered_rollout

        return staggered_rollout(
            backend, cond, noise, chunking=chunking, steps=steps, guidance=guidance, uncond=uncond,
            noise_level=noise_level, step_seeds=step_seeds, grad_steps=grad_steps, keep_states=keep_states,
            schedule=schedule, scheduler=scheduler, teacher=teacher,
        )  # fmt: skip
    spans = chunking.spans(noise.shape[2])
    stochastic = noise_level > 0
    if scheduler is not None and (stochastic or grad_steps or keep_states):
        raise VpoError("the pipeline sampler is deterministic; use --sampler euler for stochastic or trained rollouts")
    gens = [torch.Generator().manual_seed(_step_stream(s)) for s in step_seeds] if step_seeds else None
    sched = schedule or backend.schedule(steps, (noise.shape[1], chunking.window, *noise.shape[3:]))
    out = torch.zeros_like(noise, dtype=torch.float32)
    logps, states = [], ([torch.zeros_like(out) for _ in range(steps + 1)] if keep_states else None)
    grad_steps = set(grad_steps)
    c_sigma = chunking.context_noise
    mode = chunking.context_mode if c_sigma else "fresh"
    noised = torch.zeros_like(out) if mode == "once" else None  # each chunk as later chunks see it
    for k, (a, b) in enumerate(spans):
        c0 = chunk_window(chunking, noise.shape[2], k)[0]
        made = out if teacher is None else teacher
        ctx = (made if noised is None else noised)[:, :, c0:a].float().detach()
        n_ctx = ctx.shape[2]
        x = noise[:, :, a:b].float().clone()
        if scheduler is not None:
            chunk_sched = copy.deepcopy(scheduler)
            chunk_sched.set_timesteps(steps, device=noise.device)
            times = chunk_sched.timesteps
            # a scheduler that draws noise (Self-Forcing's re-noising) draws each video's from its seeded stream,
            # as diffusers pipelines hand their generator to a step that takes one
            takes_generator = "generator" in inspect.signature(chunk_sched.step).parameters
            step_kw = {"generator": gens} if takes_generator and gens else {}
        else:
            times = sched.timesteps
        if keep_states:
            states[0][:, :, a:b] = x.detach()
        for i, t in enumerate(times):
            with torch.set_grad_enabled(i in grad_steps and torch.is_grad_enabled()):
                if i not in grad_steps:
                    x = x.detach()
                fresh = c_sigma and n_ctx and mode == "fresh"
                z = noise_like(ctx, gens) if fresh else None  # each step, as SkyReels-V2's pipeline
                x_in, t_frames = window_input(ctx, x, float(t), c_sigma, z)
                raw = guided_prediction(backend, x_in.to(backend.dtype), t_frames, cond, uncond, guidance)[
                    :, :, n_ctx:
                ]
                if scheduler is not None:
                    # In place, as the pipeline writes ``latents[:, :, idx] = step(..., latents[:, :, idx])``: the
                    # scheduler keeps the sample it was given as its ``last_sample``, so UniPC's corrector then
                    # reads the updated values; stepping a copy would sample other videos than the pipeline.
                    x.copy_(chunk_sched.step(raw.float(), t, x, return_dict=False, **step_kw)[0])
                    continue
                mean, std = step_moments(backend.prediction, x, raw, sched, i, noise_level)
                if stochastic:
                    x = mean + std * noise_like(x, gens)
                    logps.append(gaussian_logp(x, mean, std))
                else:
                    x = mean
            if keep_states:
                states[i + 1][:, :, a:b] = x.detach()
        out = torch.cat([out[:, :, :a], x.float(), out[:, :, b:]], 2)
        if noised is not None:  # noised once, as it will be seen beside every later chunk
            done = (out if teacher is None else teacher)[:, :, a:b].float().detach()
            noised[:, :, a:b] = (1 - c_sigma) * done + c_sigma * noise_like(done, gens)
    return Trajectory(latents=out, logps=torch.stack(logps, 1) if logps else None, states=states)


def generate(
    backend: Backend,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    scheduler=None,
    teacher: torch.Tensor | None = None,
    stop_at: int | None = None,
    **steps_kw,
) -> Trajectory:
    """Make latents from ``noise [B, C, F, h, w]`` the way ``backend`` generates: chunk by chunk beside its own
    earlier chunks (:func:`rollout`) for an autoregressive family, all frames at once
    (:func:`~vpotool.sampling.sample`) for a bidirectional one. The one entry point stages and trainers call:
    ``steps_kw`` are the sampler's (``steps``, ``guidance``, ``uncond``, ``noise_level``, ``step_seeds``,
    ``grad_steps``, ``keep_states``);
    ``scheduler`` steps a diffusers scheduler as the family's pipeline does (deterministic only); ``teacher``
    (autoregressive) and ``stop_at`` (bidirectional) are what only one kind can do, refused in one line by the
    other."""
    chunking = chunking_of(backend)
    if chunking is not None:
        if stop_at is not None:
            raise VpoError(f"stopping part way through the denoising needs a bidirectional model; --model "
                           f"{backend.info.name} rolls out chunk by chunk")  # fmt: skip
        return rollout(backend, cond, noise, chunking=chunking, scheduler=scheduler, teacher=teacher, **steps_kw)
    if teacher is not None:
        raise VpoError(f"a teacher context needs an autoregressive model; --model {backend.info.name} makes every "
                       "frame at once")  # fmt: skip
    if scheduler is not None:
        kw = {k: steps_kw[k] for k in ("steps", "guidance", "uncond") if k in steps_kw}
        return sample_with_scheduler(backend, scheduler, cond, noise, **kw)
    return sample(backend, cond, noise, stop_at=stop_at, **steps_kw)


def chunk_window(chunking: Chunking, latent_frames: int, k: int) -> tuple[int, int, int]:
    """``(context start, chunk start, chunk end)`` in latent frames of chunk ``k`` of a video of ``latent_frames``:
    the window the model sees when it denoises that chunk."""
    a, b = chunking.spans(latent_frames)[k]
    return max(0, a - chunking.context), a, b


def chunk_frames(backend, chunking: Chunking, latent_frames: int) -> list[tuple[int, int]]:
    """The video frames ``[start, end)`` each chunk of a ``latent_frames`` rollout decodes to, with the last frame
    before it (where the chunk continues its context): what a per-chunk reward scores."""
    spans = chunking.spans(latent_frames)
    first = lambda n: decoded_frames(backend.codec, n) if n else 0  # noqa: E731
    return [(max(0, first(a) - 1), first(b)) for a, b in spans]


def teacher_forced_input(
    chunking: Chunking, x0: torch.Tensor, noised: torch.Tensor, timesteps: torch.Tensor, k: int, ctx_noise=None
):
    """The model input for chunk ``k`` of latents ``x0 [B, C, F, h, w]`` when its context is ``x0``'s own earlier
    frames (the video's, not another's): ``(x_in [B, C, W, h, w], t [B, W], n_ctx)``. ``noised``: the chunk's
    noised latents ``[B, C, b - a, h, w]`` at ``timesteps [B]``; the context is clean, or re-noised to the
    chunking's ``context_noise`` with ``ctx_noise`` (noise shaped like the context). Training losses (DPO) and
    log-probabilities (SCST) see chunks exactly as :func:`rollout` made them."""
    c0, a, _ = chunk_window(chunking, x0.shape[2], k)
    x_in, t = window_input(x0[:, :, c0:a].float().detach(), noised, timesteps, chunking.context_noise, ctx_noise)
    return x_in, t, a - c0


def rollout_step_logp(
    backend, chunking: Chunking, sched: NoiseSchedule, j: int, states, latents, cond, uncond, guidance, noise_level
):
    """Log-probability ``[B]`` (with the graph) of step ``j`` of a stochastic :func:`rollout` (chunk-major: chunk
    ``j // steps``, step ``j % steps``) under the backend's current weights, from its kept ``states`` and final
    ``latents`` (the context); plus the step's ``(mean, std)``. What policy-gradient training on the model's own
    rollouts recomputes (a clean context only: the rollout's context noise is not kept)."""
    steps = len(sched)
    k, i = divmod(j, steps)
    _, a, b = chunk_window(chunking, latents.shape[2], k)
    x, x_next = states[i][:, :, a:b].float(), states[i + 1][:, :, a:b]
    t = sched.timesteps[i].expand(x.shape[0])
    x_in, t_in, n_ctx = teacher_forced_input(chunking, latents, x, t, k)
    raw = guided_prediction(backend, x_in.to(backend.dtype), t_in, cond, uncond, guidance)[:, :, n_ctx:]
    mean, std = step_moments(backend.prediction, x, raw, sched, i, noise_level)
    return gaussian_logp(x_next, mean, std), mean, std


class NoisedInput(NamedTuple):
    """What :func:`noised_input` returns, for ``N`` latent tensors of ``B`` examples each (``N * B`` rows, tensor by
    tensor): the model input ``x_in`` and timesteps ``t`` (``[N * B]``, or ``[N * B, W]`` per frame beside a chunk's
    context), the regression ``target`` of the trained frames, the noised trained frames ``x_t`` with their
    ``alphas, sigmas [N * B]`` (to turn an output into a clean-latent prediction), ``n_ctx``, the context frames
    to drop from the model's output, and the ``chunk`` trained (None for a bidirectional model)."""

    x_in: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    x_t: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor
    n_ctx: int
    chunk: int | None


def noised_input(backend, latents: Sequence[torch.Tensor], seeds: list[int], contexts=None) -> NoisedInput:
    """The forward-process training input of clean ``latents`` (N tensors ``[B, C, F, h, w]``): example ``j`` of
    every tensor gets seed ``seeds[j]``'s timestep (the family's training distribution) and noise, so the N
    tensors share them (Diffusion-DPO's winner and loser; a prompt's candidates in forward-process policy
    optimisation). On an autoregressive model one chunk of each video is trained (chunk ``seeds[0] % chunks``),
    beside the earlier frames of ``contexts`` (N tensors like ``latents``; default the videos' own: the context a
    rollout made them beside), re-noised as the chunking says. Noise and timesteps depend on the seeds only, not
    on how examples are batched or spread over processes."""
    chunking = chunking_of(backend)
    full = list(latents if contexts is None else contexts)
    x0s, k = list(latents), None
    if chunking is not None:
        k = seeds[0] % len(chunking.spans(x0s[0].shape[2]))
        c0, lo, hi = chunk_window(chunking, x0s[0].shape[2], k)
        x0s = [x[:, :, lo:hi] for x in x0s]
    shape, dev = tuple(x0s[0].shape[1:]), x0s[0].device
    parts = [backend.training_timesteps(1, torch.Generator().manual_seed(s), shape) for s in seeds]
    sched = NoiseSchedule(*(torch.cat([getattr(p, k) for p in parts]) for k in ("timesteps", "alphas", "sigmas")))
    noise = seeded_noise(shape, [s + 1 for s in seeds], dev)
    a, s = (v.to(dev).view(-1, 1, 1, 1, 1) for v in (sched.alphas, sched.sigmas))
    x_t = torch.cat([a * x + s * noise for x in x0s])
    x_in, t, n_ctx = x_t.to(backend.dtype), torch.cat([sched.timesteps.to(dev)] * len(x0s)), 0
    if chunking is not None:
        ctx_noise = None  # a labelled context is seen clean
        if chunking.context_mode != "label":
            ctx_noise = seeded_noise((shape[0], lo - c0, *shape[2:]), [s + 2 for s in seeds], dev).repeat(
                len(x0s), 1, 1, 1, 1
            )
        x_in, t, n_ctx = teacher_forced_input(chunking, torch.cat(full), x_t, t, k, ctx_noise)
        x_in = x_in.to(backend.dtype)
    target = torch.cat([training_target(backend.prediction, x, noise, a, s) for x in x0s])
    rep = lambda v: torch.cat([v.to(dev)] * len(x0s))  # noqa: E731
    return NoisedInput(x_in, t, target, x_t, rep(sched.alphas), rep(sched.sigmas), n_ctx, k)
