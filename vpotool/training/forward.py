"""Forward-process policy optimisation for ``train-scst`` and ``loop --algo scst``: the denoising regression on the
rollouts' own clean latents, weighted by their advantages (Advantage Weighted Matching, ``awm``) or split into
DiffusionNFT's implicit positive and negative policies (``nft``). It needs no per-step log-probabilities, so any
sampler may make the rollouts (the ODE, few steps), and a prompt's candidates share timestep and noise, which
cancels most of the regression's per-sample noise from their weighted sum (docs/training.md measures it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpotool.losses import awm_loss, nft_loss, per_sample_mse
from vpotool.rollout import noised_input
from vpotool.sampling import split_prediction
from vpotool.training.common import grad_sync
from vpotool.training.lora import reference_mode


@dataclass
class Videos:
    """One micro-batch of scored rollouts for a forward-process update: clean ``latents [G * K, C, F, h, w]``, a
    prompt's ``group`` K candidates adjacent (K = 1 for a greedy baseline), ``cond`` one entry per video,
    ``advantage [G * K]`` (or ``[G * K, chunks]`` per chunk of an autoregressive rollout), ``reward``
    and ``baseline`` for logging, ``contexts`` like ``latents`` when the rollout's context was not its own frames
    (teacher forcing), ``seed``, from which timesteps and noise are drawn, and ``sampler``, the frozen policy that
    made them as :func:`~vpotool.training.lora.reference_mode` names it (``"old"``: a copy of the policy taken when
    they were sampled; ``"base"``: the base model) or None when the policy itself did and has not moved since."""

    latents: torch.Tensor
    group: int
    cond: dict
    advantage: torch.Tensor
    reward: torch.Tensor
    baseline: torch.Tensor
    seed: int
    contexts: torch.Tensor | None = None
    sampler: str | None = None


def layout(x: torch.Tensor, group: int, share: bool) -> list[torch.Tensor]:
    """``x [G * K, ...]`` as the tensors :func:`~vpotool.rollout.noised_input` shares noise across: K tensors
    ``[G, ...]`` (candidate k of every group) when a group shares, else ``[x]`` itself."""
    if not share or group == 1:
        return [x]
    return list(x.reshape(-1, group, *x.shape[1:]).unbind(1))


def forward_loss(trainer, videos: Videos, cfg, tau: int):
    """The estimator's loss (with the graph) for timestep draw ``tau`` of ``videos``, and the advantages it used
    ``[G * K]`` in the order of the model's rows. ``cfg.estimator`` awm: :func:`~vpotool.losses.awm_loss`
    (``cfg.self_normalize``); nft: :func:`~vpotool.losses.nft_loss` with beta ``cfg.nft_beta`` and the old policy
    of ``cfg.nft_old``: sampler, the frozen policy that made the videos (``videos.sampler``), which holds the
    policy near it (DiffusionNFT's trust region); current, the policy's own output detached (the gradient is then
    advantage-weighted matching with the adaptive weight, and nothing holds the policy back). ``cfg.kl_beta`` adds
    ``kl_beta * mean((out - out_ref)^2)``, the output's squared distance to the base model's (adapter disabled),
    DiffusionNFT's KL term."""
    b, den = trainer.backend, trainer.denoiser
    share = cfg.share_noise
    g = videos.latents.shape[0] // (videos.group if share else 1)
    seeds = [videos.seed * 1_009 + tau * 100_003 + 2 * j for j in range(g)]
    ctx = None if videos.contexts is None else layout(videos.contexts, videos.group, share)
    inp = noised_input(b, layout(videos.latents, videos.group, share), seeds, ctx)
    cond = {k: torch.cat(layout(v, videos.group, share)) for k, v in videos.cond.items()}  # rows as the inputs'
    adv = videos.advantage if videos.advantage.ndim == 1 else videos.advantage[:, inp.chunk]
    adv = torch.cat(layout(adv.to(inp.x_in.device), videos.group, share))
    raw = b.predict(inp.x_in, inp.t, cond)[:, :, inp.n_ctx :].float()
    if cfg.estimator == "awm":
        loss = awm_loss(raw, inp.target, adv, self_normalize=cfg.self_normalize)
    else:
        beta, old = cfg.nft_beta, raw.detach()
        if cfg.nft_old == "sampler" and videos.sampler is not None:
            with torch.no_grad(), reference_mode(den, videos.sampler):
                old = b.predict(inp.x_in, inp.t, cond)[:, :, inp.n_ctx :].float()
        x0 = lambda out: split_prediction(out, inp.x_t, inp.alphas, inp.sigmas, b.prediction)[0]  # noqa: E731
        pos, neg = x0(beta * raw + (1 - beta) * old), x0((1 + beta) * old - beta * raw)
        loss = nft_loss(pos, neg, x0(inp.target), adv, beta, cfg.adv_clip or 5.0)
    if cfg.kl_beta:
        with torch.no_grad(), reference_mode(den, "base"):
            ref = b.predict(inp.x_in, inp.t, cond)[:, :, inp.n_ctx :]
        loss = loss + cfg.kl_beta * per_sample_mse(raw, ref).mean()
    return loss, adv


def forward_step(trainer, videos: Videos, cfg, scale: float, last: bool = True) -> torch.Tensor:
    """Backpropagate ``cfg.timesteps`` timestep draws of ``videos`` (one at a time: the memory of one), each scaled
    by ``scale / cfg.timesteps``; gradients are all-reduced on the last draw of the ``last`` micro-batch. Returns the
    mean loss over the draws (detached)."""
    total = 0.0
    for tau in range(cfg.timesteps):
        with grad_sync(trainer, last=last and tau == cfg.timesteps - 1):
            loss, _ = forward_loss(trainer, videos, cfg, tau)
            trainer.accelerator.backward(loss * scale / cfg.timesteps)
        total = total + loss.detach() / cfg.timesteps
    return total
