"""vpotool's own sampler over a backend: deterministic (ODE/DDIM) and stochastic steps with log-probabilities.

Every step works on the common quantities ``x0_hat`` and ``noise_hat`` (or the flow velocity), so the same
loop serves flow, epsilon and v-prediction backends. Stochastic steps return the Gaussian log-density of the
sampled next state, which the policy-gradient trainer needs; gradient windows keep the graph only for chosen
steps, which the reward-gradient trainer needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vpotool.errors import VpoError
from vpotool.models.base import Backend, Conditioning, NoiseSchedule, cond_cat, noise_like


def _bcast(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Scalar or ``[B]`` coefficients broadcast against ``[B, ...]``."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def split_prediction(raw, x_t, alpha, sigma, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> ``(x0_hat, noise_hat)`` for ``x_t = alpha * x0 + sigma * noise``.

    flow: ``v = noise - x0`` (with alpha = 1 - sigma); epsilon: the noise; v: ``alpha * noise - sigma * x0``
    (with alpha^2 + sigma^2 = 1). ``alpha, sigma``: floats or ``[B]``. Returns float32 tensors shaped like ``x_t``.
    """
    raw, x_t = raw.float(), x_t.float()
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction == "flow":
        return x_t - s * raw, x_t + a * raw
    if prediction == "epsilon":
        return (x_t - s * raw) / a.clamp_min(1e-8), raw
    if prediction == "v":
        return a * x_t - s * raw, s * x_t + a * raw
    raise ValueError(f"unknown prediction type {prediction!r}; expected flow, epsilon or v")


def training_target(prediction: str, x0, noise, alpha, sigma) -> torch.Tensor:
    """The regression target of a denoiser with the given ``prediction`` type at ``x_t = alpha x0 + sigma noise``."""
    if prediction == "flow":
        return noise - x0
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    raise ValueError(f"unknown prediction type {prediction!r}; expected flow, epsilon or v")


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Log-density of ``x`` under N(mean, std^2) per element, averaged over all non-batch dims -> ``[B]`` float32.

    ``x`` is detached (the sample is data); gradients flow through ``mean`` (and ``std`` if it is a tensor).
    """
    std = _bcast(std, mean)
    logp = -((x.detach().float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


def flow_sde_step(x, velocity, sigma, sigma_next, noise_level: float, z=None):
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next`` (< sigma); float32 math.

    ``std_t = a * sqrt(s / (1 - s))`` (s = 1 replaced by the next sigma), ``dt = s' - s``;
    ``mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt``; ``x' = mean + std_t sqrt(-dt) z``.
    ``noise_level = 0`` is the Euler (ODE) step. Returns ``(x_next, mean, std)`` with ``std = std_t sqrt(-dt)``.
    """
    x, v = x.float(), velocity.float()
    s, s1 = _bcast(sigma, x), _bcast(sigma_next, x)
    dt = s1 - s
    s_for_std = torch.where(s >= 1.0, s1, s)
    std_t = noise_level * torch.sqrt(s_for_std / (1 - s_for_std))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    x_next = mean if noise_level == 0 or z is None else mean + std * z
    return x_next, mean, std


def ddim_step(x0_hat, noise_hat, alpha, sigma, alpha_next, sigma_next, eta: float, z=None):
    """One DDIM step (eta > 0 is the DDPO stochastic step); variance-preserving coefficients, float32.

    ``std = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar'))`` with ``abar = alpha^2``;
    ``mean = alpha' x0 + sqrt(1 - abar' - std^2) noise``. At eta = 0 this is ``alpha' x0 + sigma' noise``.
    Returns ``(x_next, mean, std)``.
    """
    x0_hat, noise_hat = x0_hat.float(), noise_hat.float()
    a, a1, s1 = _bcast(alpha, x0_hat), _bcast(alpha_next, x0_hat), _bcast(sigma_next, x0_hat)
    if eta == 0:
        mean = a1 * x0_hat + s1 * noise_hat
        return mean, mean, torch.zeros_like(a1)
    abar, abar1 = a**2, a1**2
    std = eta * torch.sqrt(((1 - abar1) / (1 - abar).clamp_min(1e-12) * (1 - abar / abar1)).clamp_min(0))
    mean = a1 * x0_hat + torch.sqrt((1 - abar1 - std**2).clamp_min(0)) * noise_hat
    x_next = mean if z is None else mean + std * z
    return x_next, mean, std


def seeded_noise(
    shape: Sequence[int], seeds: Sequence[int], device, dtype=torch.float32, frame_major: bool = False
) -> torch.Tensor:
    """Standard normal noise ``[len(seeds), *shape]`` (``shape`` = ``(C, F, h, w)``), each row from its own CPU
    generator: the same seed gives the same noise whatever the batch or device. ``frame_major`` draws a video's
    frames one after another (``[F, C, h, w]`` in the generator's order, as Self-Forcing draws its noise), so that
    the first frames of a longer video get the noise of a shorter one's: an autoregressive rollout of more frames
    from the same seed then extends the shorter video."""

    def row(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        if not frame_major:
            return torch.randn(tuple(shape), generator=gen)
        c, f, *rest = shape
        return torch.randn((f, c, *rest), generator=gen).transpose(0, 1)

    return torch.stack([row(s) for s in seeds]).to(device=device, dtype=dtype)


def _step_stream(seed: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x5EED) % (2**63 - 1)


@dataclass
class Trajectory:
    """What one sampling run produced. ``latents [B, C, F, h, w]``; ``logps [B, S]`` (stochastic runs only);
    ``states`` the S + 1 visited states (when asked), detached."""

    latents: torch.Tensor
    logps: torch.Tensor | None = None
    states: list[torch.Tensor] | None = None


def guided_prediction(backend: Backend, x, t, cond: Conditioning, uncond: Conditioning | None, guidance: float):
    """Classifier-free guided model output; both branches in one batched call."""
    tt = torch.full((x.shape[0],), float(t), device=x.device) if not torch.is_tensor(t) or t.ndim == 0 else t
    if uncond is None or guidance == 1.0:
        return backend.predict(x, tt, cond)
    pair = getattr(backend, "unconditional_for", None)  # a family whose null input depends on the prompt
    if pair is not None:
        uncond = pair(uncond, cond)
    raw = backend.predict(torch.cat([x, x]), torch.cat([tt, tt]), cond_cat(uncond, cond))
    raw_u, raw_c = raw.chunk(2)
    return raw_u + guidance * (raw_c - raw_u)


def step_moments(prediction: str, x, raw, sched: NoiseSchedule, i: int, noise_level: float):
    """Mean and std of sampling step ``i`` from state ``x`` given the (guided) model output ``raw``: the flow SDE
    for flow backends, DDIM with ``eta = noise_level`` for the others. ``std`` is clamped away from 0 so
    log-densities stay finite at deterministic steps."""
    a, s, a1, s1 = sched.alphas[i], sched.sigmas[i], sched.alphas[i + 1], sched.sigmas[i + 1]
    if prediction == "flow":
        _, mean, std = flow_sde_step(x, raw, s, s1, noise_level)
    else:
        x0_hat, n_hat = split_prediction(raw, x, a, s, prediction)
        _, mean, std = ddim_step(x0_hat, n_hat, a, s, a1, s1, noise_level)
    return mean, std.clamp_min(1e-6) if torch.is_tensor(std) else max(std, 1e-6)


def step_logp(backend: Backend, sched: NoiseSchedule, i: int, x, x_next, cond, uncond, guidance, noise_level):
    """Log-probability ``[B]`` (with the graph) of the recorded transition ``x -> x_next`` at step ``i`` under
    the backend's current weights, plus the step's ``(mean, std)``; what policy-gradient training recomputes."""
    raw = guided_prediction(backend, x.to(backend.dtype), sched.timesteps[i], cond, uncond, guidance)
    mean, std = step_moments(backend.prediction, x.float(), raw, sched, i, noise_level)
    return gaussian_logp(x_next, mean, std), mean, std


def sample(
    backend: Backend,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    noise_level: float = 0.0,
    step_seeds: Sequence[int] | None = None,
    grad_steps: Sequence[int] = (),
    keep_states: bool = False,
    schedule: NoiseSchedule | None = None,
    stop_at: int | None = None,
) -> Trajectory:
    """Denoise ``noise [B, C, F, h, w]`` in ``steps`` steps.

    ``noise_level > 0`` makes the steps stochastic (flow SDE for flow backends, DDIM eta for the others) and
    records per-step log-probabilities; ``step_seeds`` (one per sample) make that noise reproducible.
    Steps whose index is in ``grad_steps`` keep the autograd graph; every other step runs under no_grad.
    ``stop_at = i`` ends at step i and returns the model's x0 prediction there as ``latents`` (ReFL).
    """
    sched = schedule or backend.schedule(steps, tuple(noise.shape[1:]))
    x = noise.float()
    stochastic = noise_level > 0
    # Step noise gets its own stream per seed, apart from the initial noise drawn from the same seed.
    gens = [torch.Generator().manual_seed(_step_stream(s)) for s in step_seeds] if stochastic and step_seeds else None
    logps, states = [], [x.detach()] if keep_states else None
    grad_steps = set(grad_steps)
    for i in range(len(sched)):
        with torch.set_grad_enabled(i in grad_steps and torch.is_grad_enabled()):
            if i not in grad_steps:
                x = x.detach()
            raw = guided_prediction(backend, x.to(backend.dtype), sched.timesteps[i], cond, uncond, guidance)
            if i == stop_at:
                x0_hat, _ = split_prediction(raw, x, sched.alphas[i], sched.sigmas[i], backend.prediction)
                return Trajectory(latents=x0_hat, logps=torch.stack(logps, 1) if logps else None, states=states)
            mean, std = step_moments(backend.prediction, x, raw, sched, i, noise_level)
            if stochastic:
                x = mean + std * noise_like(x, gens)
                logps.append(gaussian_logp(x, mean, std))
            else:
                x = mean
        if keep_states:
            states.append(x.detach())
    return Trajectory(latents=x, logps=torch.stack(logps, 1) if logps else None, states=states)


@torch.no_grad()
def sample_with_scheduler(
    backend: Backend,
    scheduler,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> Trajectory:
    """Deterministic sampling stepped by a diffusers ``scheduler`` (a copy; e.g. Wan's UniPC multistep), as the
    family's pipeline samples: latents in float32, the guided model output handed to ``scheduler.step``. The
    backend's raw output must be what the scheduler expects (the velocity, for flow schedulers)."""
    import copy

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=noise.device)
    x = noise.float()
    for t in sched.timesteps:
        raw = guided_prediction(backend, x.to(backend.dtype), t, cond, uncond, guidance)
        x = sched.step(raw.float(), t, x, return_dict=False)[0]
    return Trajectory(latents=x)


def preset_size(size: str | None, backend) -> tuple[int, int] | None:
    """``(height, width)`` of a ``--size`` preset the backend names (its ``size_preset``), or None when unset."""
    if not size:
        return None
    lookup = getattr(backend, "size_preset", None)
    if lookup is None:
        raise VpoError(f"--size {size}: --model {backend.info.name} has no size presets; pass --height and --width")
    return lookup(size)


def use_settings(backend, settings: dict) -> None:
    """Tell a backend whose denoiser is conditioned on the video's frame count and rate (``use_video``: Open-Sora's
    fps embedding) the resolved ``settings`` it samples or trains with; others need nothing."""
    hook = getattr(backend, "use_video", None)
    if hook is not None:
        hook(settings["frames"], settings["fps"])


def resolved_settings(cfg, backend) -> dict:
    """The generation settings after filling unset flags (``frames``, ``height``, ``width``, ``steps``,
    ``guidance``, and ``fps``/``noise_level``/``sampler``/``negative_prompt`` where the config has them) from the
    backend's defaults."""
    d = backend.defaults
    height, width = preset_size(getattr(cfg, "size", None), backend) or (d.height, d.width)
    return {
        "frames": cfg.frames or d.frames,
        "height": cfg.height or height,
        "width": cfg.width or width,
        "fps": getattr(cfg, "fps", None) or d.fps,
        "steps": cfg.steps or d.steps,
        "guidance": d.guidance if cfg.guidance is None else cfg.guidance,
        "noise_level": getattr(cfg, "noise_level", 0.0),
        "sampler": getattr(cfg, "sampler", "euler"),
        "negative_prompt": getattr(cfg, "negative_prompt", ""),
    }
