"""How much shared signal each policy-optimisation estimator of ``train-scst`` carries, on the same rollouts.

From the shipped ``tiny`` model with a fresh rank-8 adapter, ``--prompts`` world:align prompts are rolled out K
times each (stochastic steps at ``--noise-level``, as ``--estimator logp`` needs; the forward-process estimators
train on the same rollouts' final latents), scored by the world reward, and given group-mean advantages. Every
estimator then computes one gradient per prompt (its K rollouts). A random halving of the prompts into two
disjoint sets gives two summed gradients; their cosine, averaged over ``--halvings`` halvings, says how much of
the gradient the prompts share (about 0: noise of the batch, which AdamW turns into full-size steps in random
directions; larger: a direction the reward's distribution agrees on). Prints one markdown row per estimator and
the CPU seconds its gradients took.

    python examples/tiny_world/rl_gradients.py --prompts 48 --candidates 4 --draws 2
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time

import torch

from vpotool.sampling import resolved_settings
from vpotool.training.common import setup
from vpotool.training.config import ScstConfig
from vpotool.training.forward import forward_step
from vpotool.training.reward import load_rollout_reward
from vpotool.training.scst import as_videos, collect, policy_step
from vpotool.world import world_prompts

# name -> (estimator options, logp's trained steps as a function of the step count, or None)
VARIANTS = {
    "logp, every step (REINFORCE)": (dict(estimator="logp"), lambda s: list(range(s))),
    "logp, the high-noise half": (dict(estimator="logp"), lambda s: list(range(s // 2))),
    "logp, the last quarter": (dict(estimator="logp"), lambda s: list(range(s - s // 4, s))),
    "awm, shared (t, noise)": (dict(estimator="awm"), None),
    "awm, independent noise": (dict(estimator="awm", share_noise=False), None),
    "nft, shared (t, noise)": (dict(estimator="nft"), None),
}


def flat_grad(params) -> torch.Tensor:
    """The adapter's gradient as one vector, then cleared."""
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return g.clone()


def split_half_cosine(grads: torch.Tensor, halvings: int, seed: int) -> float:
    """Mean cosine between the summed gradients of two random disjoint halves of ``grads [N, P]``."""
    rng, n, total = random.Random(seed), grads.shape[0], 0.0
    for _ in range(halvings):
        idx = list(range(n))
        rng.shuffle(idx)
        a, b = grads[idx[: n // 2]].sum(0), grads[idx[n // 2 : 2 * (n // 2)]].sum(0)
        total += torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return total / halvings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48, help="world:align prompts (an even number)")
    ap.add_argument("--candidates", type=int, default=4, help="rollouts per prompt (K)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of the rollouts")
    ap.add_argument("--noise-level", type=float, default=0.7, help="stochastic steps' noise level")
    ap.add_argument("--draws", type=int, default=1, help="independent draws of rollouts")
    ap.add_argument("--halvings", type=int, default=2000, help="random halvings averaged")
    args = ap.parse_args()
    prompts = [p.text for p in world_prompts("align")][: args.prompts]
    cos = {name: [] for name in VARIANTS}
    secs = dict.fromkeys(VARIANTS, 0.0)
    with tempfile.TemporaryDirectory() as out:
        base = ScstConfig(out=out, prompts="world:align", reward="world", baseline="group-mean", estimator="logp",
                          group_size=args.candidates, noise_level=args.noise_level, steps=args.steps, lora_rank=8,
                          device="cpu")  # fmt: skip
        trainer = setup(base)
        reward = load_rollout_reward(base, trainer.backend.device, need_grad=False)
        settings = resolved_settings(base, trainer.backend)
        for draw in range(args.draws):
            grads = {name: [] for name in VARIANTS}
            for i, prompt in enumerate(prompts):
                ro = collect(trainer.backend, reward, [prompt], [draw * 100_000 + i], settings, base)
                sched = trainer.backend.schedule(settings["steps"], tuple(ro.states[0].shape[1:]))
                for name, (opts, steps) in VARIANTS.items():
                    cfg = dataclasses.replace(base, **opts)
                    t0 = time.process_time()
                    if steps is None:
                        forward_step(trainer, as_videos(ro, draw * 100_000 + i), cfg, 1.0)
                    else:
                        policy_step(trainer, ro, sched, steps(len(sched)), cfg, settings, 1.0, clipped=False)
                    grads[name].append(flat_grad(trainer.params))
                    secs[name] += time.process_time() - t0
            for name, g in grads.items():
                cos[name].append(split_half_cosine(torch.stack(g), args.halvings, draw))
    print(f"| estimator ({args.prompts} prompts x {args.candidates} rollouts) | "
          + " | ".join(f"cosine, draw {d + 1}" for d in range(args.draws)) + " | CPU s |")  # fmt: skip
    print("|---|" + "---:|" * (args.draws + 1))
    for name in VARIANTS:
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cos[name]) + f" | {secs[name]:.0f} |")


if __name__ == "__main__":
    main()
