"""SkyReels-V2 Diffusion Forcing's asynchronous mode: a chunk's frames denoised on a schedule staggered over them.

With ``ar_step > 0`` (:class:`~vpotool.models.base.Chunking`), a chunk's latent frames form causal blocks of
``causal_block`` frames, and block i starts denoising ``ar_step`` steps after block i - 1, so that at any moment the
earlier frames are cleaner than the later ones (a "denoising wave"); the model sees the whole window, each frame at
its own timestep (the context clean, or at ``context_noise``; blocks not started at 999, finished ones at 0), and
only the blocks due a step this iteration are stepped. :func:`stagger` is ``SkyReelsV2DiffusionForcingPipeline``'s
``generate_timestep_matrix`` for one window; :func:`staggered_rollout` is its long-video loop, which
:func:`vpotool.rollout.rollout` hands asynchronous chunkings to. Deterministic sampling only: the trainers and
stochastic rollouts refuse ``ar_step > 0``.
"""

from __future__ import annotations

import copy

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Backend, Chunking, Conditioning, NoiseSchedule, noise_like
from vpotool.sampling import Trajectory, _step_stream, guided_prediction, step_moments

NOT_STARTED_T = 999.0  # the pipeline's timestep for a block still pure noise (its step template's dummy first entry)


def stagger(blocks: int, steps: int, ar_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The staggered schedule of a window of ``blocks`` causal blocks denoised in ``steps`` steps, block i lagging
    block i - 1 by ``ar_step`` steps until i - 1 is done: ``(index, update)``, both ``[I, blocks]`` over the I
    iterations. ``index[n, i]`` is block i's place at iteration n: 0 not started, ``j`` in ``1..steps`` taking step
    ``j - 1`` (at grid timestep ``j - 1``) now, ``steps + 1`` clean; ``update[n, i]`` whether it is stepped then.
    ``ar_step = 0`` is the synchronous schedule: ``steps`` iterations, every block stepped at each. The context
    before the window is clean throughout and not part of it (the pipeline's ``num_pre_ready`` blocks)."""
    done = steps + 1
    row = torch.zeros(blocks, dtype=torch.long)
    index, update = [], []
    while not bool((row >= steps).all()):
        new = torch.zeros_like(row)
        for i in range(blocks):
            new[i] = row[i] + 1 if i == 0 or row[i - 1] >= steps else new[i - 1] - ar_step
        new = new.clamp(0, done)
        update.append((new != row) & (new != done))
        index.append(new)
        row = new
    return torch.stack(index), torch.stack(update)


def staggered_rollout(
    backend: Backend,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    chunking: Chunking,
    steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    noise_level: float = 0.0,
    step_seeds=None,
    grad_steps=(),
    keep_states: bool = False,
    schedule: NoiseSchedule | None = None,
    scheduler=None,
    teacher: torch.Tensor | None = None,
) -> Trajectory:
    """:func:`vpotool.rollout.rollout` (same arguments, deterministic only) for an asynchronous ``chunking``: each
    chunk's frames ``[B, C, f, h, w]`` start from their frames of ``noise`` and follow :func:`stagger` in blocks,
    beside the chunk's context. With ``scheduler`` (the pipeline's UniPC) each block steps its own copy in place,
    as the pipeline steps each frame's; else vpotool's deterministic step on ``schedule`` (the backend's for
    ``steps``). ``step_seeds`` seed the context noise (``context_noise > 0``), drawn afresh at every iteration as
    the pipeline draws it. Stochastic steps (``noise_level > 0``), ``grad_steps`` and ``keep_states`` are refused
    in one line: the trainers and ``--save-trajectory`` need ``ar_step=0``."""
    if noise_level > 0 or grad_steps or keep_states:
        raise VpoError(
            f"--model-options ar_step={chunking.ar_step} (asynchronous diffusion forcing) samples deterministically "
            "only: use --noise-level 0 without --save-trajectory, or ar_step=0 to train or sample stochastically"
        )
    gens = [torch.Generator().manual_seed(_step_stream(s)) for s in step_seeds] if step_seeds else None
    sched = schedule or backend.schedule(steps, (noise.shape[1], chunking.window, *noise.shape[3:]))
    if scheduler is not None:
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(steps, device=noise.device)
        grid = scheduler.timesteps
    else:
        grid = sched.timesteps
    # the model's timestep for each place of :func:`stagger`: not started, the grid's, clean
    times = torch.cat([torch.tensor([NOT_STARTED_T]), grid.float().cpu(), torch.tensor([0.0])]).to(noise.device)
    c_sigma, size = chunking.context_noise, chunking.causal_block
    out = torch.zeros_like(noise, dtype=torch.float32)
    for a, b in chunking.spans(noise.shape[2]):
        c0 = max(0, a - chunking.context)
        ctx = (out if teacher is None else teacher)[:, :, c0:a].float()
        n_ctx, f = ctx.shape[2], b - a
        x = noise[:, :, a:b].float().clone()
        index, update = stagger(f // size, steps, chunking.ar_step)
        block_scheds = [copy.deepcopy(scheduler) for _ in range(f // size)] if scheduler is not None else None
        t_ctx = torch.full((x.shape[0], n_ctx), c_sigma * 1000.0, device=x.device)
        for row, due in zip(index, update, strict=True):
            c_in = ctx
            if c_sigma and n_ctx:  # fresh each iteration, as the pipeline
                c_in = (1 - c_sigma) * ctx + c_sigma * noise_like(ctx, gens).to(ctx)
            t_chunk = times[row.to(x.device)].repeat_interleave(size).expand(x.shape[0], f)
            x_in = torch.cat([c_in.to(x.dtype), x], 2).to(backend.dtype)
            raw = guided_prediction(backend, x_in, torch.cat([t_ctx, t_chunk], 1), cond, uncond, guidance)
            raw = raw[:, :, n_ctx:].float()
            for i in due.nonzero().flatten().tolist():
                s, e, j = i * size, (i + 1) * size, int(row[i]) - 1
                if block_scheds is not None:
                    # in place, as the pipeline writes each frame's step into its latents (UniPC's corrector
                    # reads the sample it was given, updated)
                    xb = x[:, :, s:e]
                    xb.copy_(block_scheds[i].step(raw[:, :, s:e], grid[j], xb, return_dict=False)[0])
                else:
                    x[:, :, s:e] = step_moments(backend.prediction, x[:, :, s:e], raw[:, :, s:e], sched, j, 0.0)[0]
        out[:, :, a:b] = x
    return Trajectory(latents=out)
