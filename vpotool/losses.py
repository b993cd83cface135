"""Pure loss functions for the trainers (Diffusion-DPO, ReFL, SCST/GRPO policy gradients): tensors in, tensors out."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dim: ``pred, target [B, ...]`` (any float dtype) -> ``[B]`` float32."""
    return ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)


class DpoOutput(NamedTuple):
    """What :func:`dpo_loss` returns. ``loss`` keeps the graph; every other field is detached, for logging."""

    loss: torch.Tensor  # scalar float32
    inside: torch.Tensor  # [B] float32, -0.5 * beta * (model_diff - ref_diff)
    implicit_acc: torch.Tensor  # scalar, mean(inside > 0) with ties counted as 0.5
    reward_margin: torch.Tensor  # scalar, inside.mean()
    model_diff: torch.Tensor  # scalar, mean(policy_w - policy_l)
    ref_diff: torch.Tensor  # scalar, mean(ref_w - ref_l)


def dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    ipo_tau: float = 500.0,
) -> DpoOutput:
    """Diffusion-DPO loss from per-sample denoising errors (see :func:`per_sample_mse`), all ``[B]``.

    Policy errors carry the graph; reference errors are detached (constants), whatever their ``requires_grad``.
    With ``model_diff = policy_w - policy_l``, ``ref_diff = ref_w - ref_l`` and
    ``inside = -0.5 * beta * (model_diff - ref_diff)`` (float32, ``[B]``):

    - ``"sigmoid"`` (Wallace et al.): ``-logsigmoid(inside).mean()``; ln 2 when policy == reference.
    - ``"hinge"``: ``relu(1 - inside).mean()``.
    - ``"ipo"`` (Azar et al.): ``((h - 1 / (2 * ipo_tau)) ** 2).mean()`` with the *unscaled*
      ``h = ref_diff - model_diff`` (``beta`` does not enter this loss). ``ipo_tau`` plays the role of beta:
      the loss pulls the error margin ``h`` to ``1 / (2 tau)``. The default 500 sets that target to 1e-3 in
      units of per-sample MSE, about the margin a Diffusion-DPO run at beta = 5000 reaches
      (inside = 0.5 * 5000 * 1e-3 = 2.5). Its gradient at initialisation, ``d loss / d model_diff = 1 / tau``,
      is far below the sigmoid loss's ``beta / 4``, so IPO wants a larger learning rate; a per-model knob.

    Logged fields: ``implicit_acc = mean((inside > 0) + 0.5 * (inside == 0))`` — ties count as half, so a policy
    identical to its reference (inside == 0 everywhere) reads 0.5 instead of the reference code's 0;
    ``reward_margin = inside.mean()`` (the implicit reward margin, beta-scaled, also for IPO); ``model_diff``
    and ``ref_diff`` are batch means. Raises ``ValueError`` for an unknown ``loss_type``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    model_diff = policy_w.float() - policy_l.float()
    ref_diff = ref_w.detach().float() - ref_l.detach().float()
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inside).mean()
    elif loss_type == "hinge":
        loss = F.relu(1 - inside).mean()
    else:
        if ipo_tau <= 0:
            raise ValueError(f"ipo_tau must be > 0, got {ipo_tau}; it sets the target margin 1 / (2 * ipo_tau)")
        loss = ((ref_diff - model_diff - 1 / (2 * ipo_tau)) ** 2).mean()
    ins = inside.detach()
    acc = ((ins > 0).float() + 0.5 * (ins == 0).float()).mean()
    return DpoOutput(loss, ins, acc, ins.mean(), model_diff.detach().mean(), ref_diff.mean())


def refl_loss(reward: torch.Tensor, target: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reward-gradient loss: ``-reward.mean()``, or ``|target - reward|.mean()`` when a target is given.

    ``reward [B]`` (differentiable, any float dtype); ``target`` a float or ``[B]``. Returns a float32 scalar.
    """
    reward = reward.float()
    if target is None:
        return -reward.mean()
    return (torch.as_tensor(target, dtype=torch.float32, device=reward.device) - reward).abs().mean()


def scst_advantage(reward: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Self-critical advantage ``reward - baseline``, both ``[B]`` (baseline: the deterministic sample's reward).

    Positive when the sampled trajectory beats its greedy baseline. Returns ``[B]`` float32, detached.
    """
    return (reward.detach().float() - baseline.detach().float()).reshape(-1)


def chunk_advantage(reward: torch.Tensor, baseline: torch.Tensor, to_go: bool = True) -> torch.Tensor:
    """Per-chunk self-critical advantage of an autoregressive rollout: ``reward, baseline [B, K]`` are each chunk's
    reward for the sample and its greedy rollout. Chunk k is credited with the mean advantage of chunks k..K-1,
    ``A_k = mean_{j >= k} (r_j - b_j)`` (reward to go): its steps shape the chunks after it, through their context,
    and cannot change those before it. Without ``to_go`` (a rollout beside the teacher's context, where a chunk
    shapes no other chunk's context) chunk k is credited with its own ``r_k - b_k``. Returns ``[B, K]`` float32,
    detached."""
    d = (reward.detach().float() - baseline.detach().float()).reshape(reward.shape[0], -1)
    if not to_go:
        return d
    counts = torch.arange(d.shape[1], 0, -1, dtype=d.dtype, device=d.device)
    return d.flip(1).cumsum(1).flip(1) / counts


def group_advantage(reward: torch.Tensor, group_size: int, eps: float = 1e-4, scope: str = "group") -> torch.Tensor:
    """GRPO advantage ``(R - mean_group) / (std + eps)`` for ``reward [B]`` laid out as ``B / K`` groups of K.

    The K candidates of one prompt are adjacent (rows ``g*K .. g*K + K - 1``). The mean is always per group;
    ``scope="group"`` takes the std per group, ``scope="batch"`` over the whole batch. The std is the population
    std (``unbiased=False``): it makes each group's advantages have unit RMS whatever K, is defined for K = 1
    and does not inflate small groups (K = 2 would otherwise be scaled by 1/sqrt(2)). A group whose rewards are
    all equal gets zero advantage. Returns ``[B]`` float32, detached.
    """
    if scope not in ("group", "batch"):
        raise ValueError(f"unknown advantage scope {scope!r}; expected group or batch")
    r = reward.detach().float().reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"batch of {r.numel()} rewards is not a whole number of groups of {group_size}")
    groups = r.reshape(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    std = groups.std(1, unbiased=False, keepdim=True) if scope == "group" else r.std(unbiased=False)
    return (centred / (std + eps)).reshape(-1)


def normalize_advantage(
    advantage: torch.Tensor, clip: float | None = None, *, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Rescale ``advantage [B]`` to unit RMS over the batch (``A / (sqrt(mean A^2) + eps)``), then clip to +-clip.

    The RMS, not the std, is the scale so signs are kept (a sample that beat its baseline stays positive) and an
    all-equal batch is not blown up by a zero std. ``scale=False`` only clips. Returns ``[B]`` float32, detached.
    """
    a = advantage.detach().float()
    if scale:
        a = a / (a.pow(2).mean().sqrt() + eps)
    return a if clip is None else a.clamp(-clip, clip)


def policy_gradient_loss(
    logp: torch.Tensor,
    advantage: torch.Tensor,
    logp_old: torch.Tensor | None = None,
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Policy-gradient loss over sampled denoising trajectories; returns a float32 scalar.

    ``logp [B, S]``: per-step log-densities of the sampled next states, as the sampler returns them (a Gaussian
    log-density *averaged* over latent dims, see :func:`vpotool.sampling.gaussian_logp`), with the graph.
    ``advantage [B]`` is treated as a constant.

    - ``logp_old`` None: SCST/REINFORCE, ``-(A * logp.sum(1)).mean()`` (sum over steps, mean over batch).
    - ``logp_old [B, S]`` given (detached): PPO per step, ``ratio = exp(logp - logp_old)``,
      ``mean(max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)))`` over batch and steps;
      ``clip_eps`` None leaves the ratio unclipped. At ``ratio == 1`` its gradient is the REINFORCE one / S.
    """
    logp = logp.float()
    adv = advantage.detach().float().reshape(-1, 1)
    if logp.ndim != 2 or adv.shape[0] != logp.shape[0]:
        raise ValueError(f"expected logp [B, S] and advantage [B], got {tuple(logp.shape)} and {tuple(adv.shape)}")
    if logp_old is None:
        return -(adv[:, 0] * logp.sum(1)).mean()
    ratio = torch.exp(logp - logp_old.detach().float())
    unclipped = -adv * ratio
    if clip_eps is None:
        return unclipped.mean()
    return torch.maximum(unclipped, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)).mean()


def kl_to_reference(mean_pi: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL between the policy's and the reference's Gaussian steps with a shared std, per sample.

    ``mean((mean_pi - mean_ref)^2) / (2 std^2)`` with the mean over non-batch dims; ``mean_pi, mean_ref [B, ...]``
    (reference detached), ``std`` a float or a tensor of 1 or B elements (e.g. the sampler's ``[B, 1, ...]``).
    Returns ``[B]`` float32. Matches the per-dim-averaged convention of the sampler's log-probs.
    """
    sq = ((mean_pi.float() - mean_ref.detach().float()) ** 2).reshape(mean_pi.shape[0], -1).mean(1)
    std = torch.as_tensor(std, dtype=torch.float32, device=sq.device).reshape(-1)
    return sq / (2 * std**2)


def leave_one_out_advantage(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantage ``R_i - mean_{j != i} R_j`` for ``reward [B]`` laid out as ``B / K`` adjacent groups of K
    (K >= 2). Unscaled (a reward difference, as :func:`scst_advantage`). Returns ``[B]`` float32, detached."""
    r = reward.detach().float().reshape(-1)
    if group_size < 2 or r.numel() % group_size:
        raise ValueError(f"leave-one-out needs whole groups of 2 or more, got {r.numel()} rewards in {group_size}s")
    groups = r.reshape(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def awm_loss(pred: torch.Tensor, target: torch.Tensor, advantage: torch.Tensor, self_normalize: bool = False):
    """Advantage-weighted flow matching: the denoising regression on a rollout's own clean latents, weighted by
    its advantage, ``mean_B(A * e)`` with ``e = per_sample_mse(pred, target)`` (:func:`per_sample_mse`).

    ``pred [B, ...]`` carries the graph; ``target [B, ...]`` (the family's regression target at ``x_t``, e.g.
    ``noise - x0`` for flow models) and ``advantage [B]`` are constants. Minimising it lowers the error of
    videos that beat their baseline (A > 0) and raises that of those that lost: the gradient of the flow-matching
    log-likelihood ``-e`` weighted by A, which is Advantage Weighted Matching's objective at ratio 1 (one pass over
    fresh rollouts) and Diffusion-DPO's gradient at initialisation with A = +-1. ``self_normalize`` divides each
    sample's error by its detached mean absolute error (floored at 1e-5), DiffusionNFT's adaptive weight, so every
    video's term has the scale of its error rather than its square. Returns a float32 scalar."""
    adv = advantage.detach().float().reshape(-1)
    err = per_sample_mse(pred, target)
    if adv.shape != err.shape:
        raise ValueError(f"expected pred [B, ...] and advantage [B], got {tuple(pred.shape)} and {tuple(adv.shape)}")
    if self_normalize:
        scale = (pred.detach().float() - target.float()).abs().reshape(err.shape[0], -1).mean(1).clamp_min(1e-5)
        err = err / scale
    return (adv * err).mean()


def nft_optimality(advantage: torch.Tensor, adv_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r = clamp(clip(A, -M, M) / M / 2 + 0.5, 0, 1)``, ``M = adv_max``:
    1 for the best videos, 0 for the worst, 0.5 at the baseline. ``advantage [B]`` -> ``[B]`` float32."""
    a = advantage.detach().float().reshape(-1).clamp(-adv_max, adv_max)
    return (a / adv_max / 2 + 0.5).clamp(0, 1)


def nft_loss(
    x0_pos: torch.Tensor, x0_neg: torch.Tensor, x0: torch.Tensor, advantage: torch.Tensor, beta: float, adv_max: float
) -> torch.Tensor:
    """DiffusionNFT's negative-aware fine-tuning loss from its two implicit policies' clean-latent predictions.

    With the policy ``v`` (graph) and the old policy ``v_old`` (constant), the implicit positive and negative policies
    are ``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v``; ``x0_pos, x0_neg [B, ...]`` are
    their predictions of the clean latents ``x0 [B, ...]`` (for a flow model ``x_t - t v+-``; the caller converts
    any prediction type, which is affine in the model output). Each side's error ``L+- = mean((x0+- - x0)^2) / w+-``
    with ``w+- = mean|x0+- - x0|`` detached and floored at 1e-5 (the adaptive weight), and
    ``loss = adv_max * mean(r L+ / beta + (1 - r) L- / beta)`` with ``r = nft_optimality(A, adv_max)``. When
    ``v_old == v`` (in value) its gradient is ``mean(clip(A, -M, M) * grad(e / w))`` with ``e`` the clean-latent
    error, whatever beta: advantage-weighted flow matching with the adaptive weight (for a flow model ``t`` times
    :func:`awm_loss` with ``self_normalize``). ``advantage [B]``. Returns a float32 scalar."""
    if beta <= 0 or adv_max <= 0:
        raise ValueError(f"nft_loss needs beta > 0 and adv_max > 0, got {beta} and {adv_max}")
    r = nft_optimality(advantage, adv_max)
    x0 = x0.detach().float()

    def side(pred):
        diff = pred.float() - x0
        w = diff.detach().abs().reshape(diff.shape[0], -1).mean(1).clamp_min(1e-5)
        return (diff**2).reshape(diff.shape[0], -1).mean(1) / w

    pos, neg = side(x0_pos), side(x0_neg)
    if r.shape != pos.shape:
        raise ValueError(f"expected latents [B, ...] and advantage [B], got {tuple(x0.shape)} and {tuple(r.shape)}")
    return adv_max * (r * pos / beta + (1 - r) * neg / beta).mean()
