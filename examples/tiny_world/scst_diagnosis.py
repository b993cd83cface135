"""Why SCST does not move the tiny model at the loop's budget: how consistent its gradient is, next to DPO's on
the same rollouts.

For each sampling noise level, two disjoint sets of prompts (A and B) are rolled out K times each from the base
model with a fresh LoRA adapter; on each set it computes the SCST gradient (group-mean baseline, REINFORCE over
every denoising step, as ``train-scst`` computes it) and the Diffusion-DPO gradient on the best-vs-worst pair of
each prompt's rollouts. A gradient that points the same way on A and B (cosine well above 0) carries signal
about the prompts' distribution; one whose cosine is near 0 is mostly noise of the batch, and AdamW, whose step
size does not depend on the gradient's size, then steps in a random direction. Prints one table row per noise
level: the within-prompt reward spread the advantages rank, and the part of it left when a prompt's rollouts
share their initial noise and differ only in the stochastic steps, the only part a rollout's log-probability
(over its steps) can be credited with.

    python examples/tiny_world/scst_diagnosis.py --prompts 16 --candidates 4 --noise-levels 0.7,1.5

On the autoregressive model, with train-scst's greedy baseline and its chunk options (no DPO column then: one
rollout per prompt makes no pair; the spread columns need a group):

    python examples/tiny_world/scst_diagnosis.py --model tiny-ar --frames 33 --steps 10 --baseline greedy \
        --normalize --variants video/own,chunk/own,video/teacher
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

from vpotool.sampling import resolved_settings, sample, seeded_noise
from vpotool.training.common import setup
from vpotool.training.config import DpoConfig, ScstConfig
from vpotool.training.dpo import pair_loss
from vpotool.training.reward import load_rollout_reward, reward_values
from vpotool.training.scst import collect, policy_step
from vpotool.world import world_prompts


def flat_grad(params) -> torch.Tensor:
    """The adapter's gradient as one vector, then cleared."""
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return g.clone()


def gradients(trainer, reward, prompts: list[str], seed: int, cfg: ScstConfig, dpo: DpoConfig) -> dict:
    """SCST and DPO gradients on one set of ``prompts`` (``cfg.group_size`` rollouts each; with the greedy baseline,
    one rollout each and no DPO gradient)."""
    b, k = trainer.backend, cfg.group_size
    settings = resolved_settings(cfg, b)
    seeds = [seed * 1000 + i for i in range(len(prompts))]
    ro = collect(b, reward, prompts, seeds, settings, cfg)
    sched = b.schedule(settings["steps"], tuple(ro.states[0].shape[1:]))
    policy_step(trainer, ro, sched, list(range(ro.logps.shape[1])), cfg, settings, 1.0, clipped=False)
    g_scst = flat_grad(trainer.params)
    if cfg.baseline == "greedy":
        return {"scst": g_scst, "dpo": None, "spread": float("nan"), "reward": ro.reward.mean().item()}
    r = ro.reward.view(-1, k)
    best, worst = r.argmax(1) + torch.arange(len(prompts)) * k, r.argmin(1) + torch.arange(len(prompts)) * k
    x0 = ro.states[-1]
    out = pair_loss(b, trainer.denoiser, x0[best], x0[worst], b.condition(prompts), seeds, dpo, "base")
    out.loss.backward()
    g_dpo = flat_grad(trainer.params)
    return {"scst": g_scst, "dpo": g_dpo, "spread": r.std(1).mean().item(), "reward": r.mean().item()}


@torch.no_grad()
def step_noise_spread(backend, reward, prompts: list[str], cfg: ScstConfig) -> float:
    """The reward spread among ``cfg.group_size`` rollouts of each prompt that share their initial noise and differ
    only in the noise of the stochastic steps: the part of the spread the policy gradient can credit to its steps
    (a rollout's log-probability covers its steps, not the initial noise)."""
    settings, k = resolved_settings(cfg, backend), cfg.group_size
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = seeded_noise(shape, list(range(len(prompts))), backend.device).repeat_interleave(k, 0)
    texts = [p for p in prompts for _ in range(k)]
    uncond = backend.encode_negative(len(texts)) if settings["guidance"] != 1.0 else None
    step_seeds = [7_000 + i for i in range(len(texts))]
    traj = sample(backend, backend.condition(texts), noise, steps=settings["steps"], guidance=settings["guidance"],
                  uncond=uncond, noise_level=cfg.noise_level, step_seeds=step_seeds)  # fmt: skip
    frames = backend.decode(traj.latents.to(backend.dtype))[:, : settings["frames"], :, : settings["height"]]
    r = reward_values(reward, frames[..., : settings["width"]], texts, cfg, settings["fps"]).float()
    return r.view(-1, k).std(1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per set (two disjoint sets)")
    ap.add_argument("--candidates", type=int, default=4, help="rollouts per prompt (K)")
    ap.add_argument("--noise-levels", default="0.7,1.5", help="comma-separated SDE noise levels")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--baseline", default="group-mean", choices=["group-mean", "greedy"])
    ap.add_argument("--normalize", action="store_true", help="advantages to unit RMS, as train-scst --normalize")
    ap.add_argument("--variants", default="video/own", help="advantage/context pairs (autoregressive models)")
    args = ap.parse_args()

    texts = [p.text for p in world_prompts("align")]
    random.Random(0).shuffle(texts)
    sets = texts[: args.prompts], texts[args.prompts : 2 * args.prompts]
    cos = torch.nn.functional.cosine_similarity
    print(
        "| noise level | advantage / context | reward spread within a prompt | of it, with one initial noise "
        "| SCST cosine A vs B | DPO cosine A vs B | SCST / DPO norm |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    greedy = args.baseline == "greedy"
    for level in [float(x) for x in args.noise_levels.split(",")]:
        for variant in args.variants.split(","):
            advantage, context = variant.split("/")
            with tempfile.TemporaryDirectory() as out:
                cfg = ScstConfig(out=out, prompts="world:align", reward="world", baseline=args.baseline,
                                 group_size=1 if greedy else args.candidates, noise_level=level, lora_rank=8,
                                 device="cpu", steps=args.steps, model=args.model, frames=args.frames,
                                 normalize=args.normalize, advantage=advantage, context=context,
                                 estimator="logp")  # fmt: skip
                trainer = setup(cfg)
                reward = load_rollout_reward(cfg, trainer.backend.device, need_grad=False)
                dpo = DpoConfig(out=out, pairs="-", beta=500.0)
                a, b = (gradients(trainer, reward, s, i, cfg, dpo) for i, s in enumerate(sets))
                own = float("nan") if greedy else step_noise_spread(trainer.backend, reward, sets[0], cfg)
            c_scst = cos(a["scst"], b["scst"], dim=0).item()
            c_dpo = float("nan") if greedy else cos(a["dpo"], b["dpo"], dim=0).item()
            ratio = float("nan") if greedy else (a["scst"].norm() / a["dpo"].norm()).item()
            spread = (a["spread"] + b["spread"]) / 2
            print(f"| {level} | {variant} | {spread:.3f} | {own:.3f} | {c_scst:.3f} | {c_dpo:.3f} | {ratio:.4f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
