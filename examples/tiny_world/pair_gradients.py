"""Do fresh preference pairs teach something else than pairs sampled once from the base model? The Diffusion-DPO
gradient of a loop's policy on the pairs it has just sampled, against its gradient on offline pairs.

For each round r of an online run (``vpotool loop``), the policy that sampled round r (its checkpoint at step
r x steps-per-iter, with its reference set to itself, as right after a curriculum update: every pair then weighs
the same) takes the DPO gradient on four sets of pairs of equal size: two disjoint halves of round r's own pairs
(fresh: split by prompt) and two sets drawn from an offline run's pairs (every video sampled once from the base
model). Printed per round, and averaged:

- ``fresh/fresh``: the cosine between the two fresh halves: how much of a fresh set's direction is signal about
  the prompts' distribution rather than noise of the batch (the ceiling for any other set);
- ``fresh/offline``: the cosine between a fresh half and an offline set; near ``fresh/fresh``: offline pairs
  point where fresh ones do, so sampling them afresh buys nothing; well below it: the offline pairs have gone
  stale;
- ``offline/offline``: the same ceiling for two offline sets.

    python examples/tiny_world/pair_gradients.py --online runs/online-offline/online-dpo-seed0 \
        --offline runs/online-offline/offline-dpo-seed0 [--rounds 1,6,11]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
import yaml
from torch.nn.functional import cosine_similarity as cos

from vpotool.manifest import read_manifest
from vpotool.training.common import setup
from vpotool.training.config import DpoConfig
from vpotool.training.dpo import load_pair_latents, pair_loss
from vpotool.training.lora import copy_adapter

BATCH = 4


def flat_grad(params) -> torch.Tensor:
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return g.clone()


def gradient(trainer, pairs_path: Path, rows: list[dict], cfg: DpoConfig, cache: Path, seed: int) -> torch.Tensor:
    """The summed DPO gradient on ``rows`` (pairs of ``pairs_path``), the reference equal to the policy."""
    b = trainer.backend
    x0_w, x0_l = load_pair_latents(pairs_path, rows, b, cache)
    for start in range(0, len(rows), BATCH):
        idx = list(range(start, min(start + BATCH, len(rows))))
        seeds = [seed * 7_919 + 2 * i for i in idx]
        cond = b.condition([rows[i]["prompt"] for i in idx])
        out = pair_loss(b, trainer.denoiser, x0_w[idx], x0_l[idx], cond, seeds, cfg, "ref")
        out.loss.backward()
    return flat_grad(trainer.params)


def halves_by_prompt(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    prompts = sorted({r["prompt_id"] for r in rows})
    rng.shuffle(prompts)
    first = set(prompts[: len(prompts) // 2])
    return [r for r in rows if r["prompt_id"] in first], [r for r in rows if r["prompt_id"] not in first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--online", type=Path, required=True, help="an online `vpotool loop` run folder")
    ap.add_argument("--offline", type=Path, required=True, help="an offline run folder (one round of sampling)")
    ap.add_argument("--rounds", default="", help="rounds to measure, e.g. 1,6,11 (default: every round after 0)")
    args = ap.parse_args()
    loop = yaml.safe_load((args.online / "loop.yaml").read_text())
    per_round = loop["steps_per_iter"]
    offline_path = args.offline / "iter-0000" / "pairs.parquet"
    offline = read_manifest(offline_path, "pairs").to_pylist()
    rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else range(1, loop["iterations"])
    print("| round | pairs per set | fresh/fresh | fresh/offline | offline/offline |")
    print("|---:|---:|---:|---:|---:|")
    totals = []
    for r in rounds:
        rng = random.Random(r)
        fresh_path = args.online / f"iter-{r:04d}" / "pairs.parquet"
        a1, a2 = halves_by_prompt(read_manifest(fresh_path, "pairs").to_pylist(), rng)
        n = min(len(a1), len(a2))
        a1, a2 = a1[:n], a2[:n]
        b1, b2 = halves_by_prompt(offline, rng)
        b1, b2 = rng.sample(b1, n), rng.sample(b2, n)
        with tempfile.TemporaryDirectory() as out:
            checkpoint = args.online / "checkpoints" / f"step-{r * per_round}"
            cfg = DpoConfig(out=out, pairs="-", init_adapter=str(checkpoint), lora_rank=loop["lora_rank"],
                            beta=loop["beta"], device="cpu", model=loop["model"])  # fmt: skip
            trainer = setup(cfg, extra_adapters=("ref",))
            copy_adapter(trainer.denoiser, "default", "ref")
            cache = Path(out) / "cache"
            g = {name: gradient(trainer, path, rows, cfg, cache, seed=r)
                 for name, path, rows in (("a1", fresh_path, a1), ("a2", fresh_path, a2),
                                          ("b1", offline_path, b1), ("b2", offline_path, b2))}  # fmt: skip
        row = (cos(g["a1"], g["a2"], dim=0).item(),
               (cos(g["a1"], g["b1"], dim=0).item() + cos(g["a2"], g["b2"], dim=0).item()) / 2,
               cos(g["b1"], g["b2"], dim=0).item())  # fmt: skip
        totals.append(row)
        print(f"| {r} | {n} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} |", flush=True)
    mean = [sum(t[i] for t in totals) / len(totals) for i in range(3)]
    print(f"| mean | | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |")


if __name__ == "__main__":
    main()
