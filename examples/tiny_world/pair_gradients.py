"""Do fresh preference pairs point elsewhere than pairs sampled once from the base model, and how much of a DPO step
is signal at all? The Diffusion-DPO gradient of a checkpoint on pairs it samples now, against its gradient on
offline pairs, with the noise of single pairs taken out.

For each CHECKPOINT (a ``checkpoints/step-N`` folder of a `vpotool loop` or `train-dpo` run on the tiny world):

1. **fresh pairs**: the checkpoint samples ``--prompts`` prompts of its run's training set x K candidates, the run's
   reward scores them and they are paired as the loop pairs them (every two candidates above the margin), into
   OUT/NAME (resumable, as every stage is);
2. **offline pairs**: as many pairs drawn from ``--offline`` (an offline run's pairs: every video from the base);
3. **one gradient per pair**: the DPO gradient of the checkpoint's LoRA weights with the reference equal to the
   policy (as right after a curriculum update: every pair weighs the same), averaged over ``--draws`` timesteps
   and noises.

A single pair's gradient is mostly noise (which timestep, which noise, which two videos), so the cosine of two
small sets' mean gradients is near 0 whatever the sets are. The expected gradients ``mu`` of the two pair
distributions are estimated without that noise: ``|mu|^2`` from the dot products of gradients of *different*
prompts only (an unbiased estimate; pairs of one prompt share videos), ``mu_fresh . mu_offline`` from the two
independent sets. Printed per checkpoint, with jackknife (leave one prompt out) standard errors:

- ``signal/pair``: ``|mu|^2 / E|g|^2``, the share of one pair's squared gradient that is the expected direction;
  ``signal/step``: the same for a step's mean over the run's batch of pairs (``--batch``, the loop's 4);
- ``cos(fresh, offline)``: the cosine of the two expected gradients: 1, offline pairs teach the checkpoint what
  fresh ones do; well below 1, they have gone stale;
- ``raw cos``: the plain cosine of the two sets' mean gradients (what noise leaves of it at this many pairs).

The table also goes to OUT/figures.md, the figures to OUT/figures.parquet.

    python examples/tiny_world/pair_gradients.py RUN/checkpoints/step-48 RUN/checkpoints/step-288 ... \
        --offline OFFLINE/iter-0000/pairs.parquet --out runs/pair-gradients [--prompts 64 --draws 4]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from vpotool.config import PairConfig, SampleConfig, ScoreConfig
from vpotool.manifest import read_manifest, write_manifest
from vpotool.prompts import load_prompts
from vpotool.stages.pair import run_pair
from vpotool.stages.sample import run_sample
from vpotool.stages.score import run_score
from vpotool.training.common import setup
from vpotool.training.config import DpoConfig
from vpotool.training.dpo import load_pair_latents, pair_loss
from vpotool.training.lora import copy_adapter


def run_settings(checkpoint: Path) -> dict:
    """The settings of the run that wrote ``checkpoint``: its loop.yaml, or a train-dpo run's config (trained on
    pairs of world:align scored by the world reward, as the loop's)."""
    run = checkpoint.parent.parent
    for name in ("loop.yaml", "train-dpo.yaml"):
        if (run / name).is_file():
            return {"prompts": "world:align", "reward": "world", **yaml.safe_load((run / name).read_text())}
    raise SystemExit(f"{run} holds no loop.yaml or train-dpo.yaml: pass checkpoints of vpotool runs")


def fresh_pairs(checkpoint: Path, run: dict, out: Path, n_prompts: int, candidates: int, seed: int) -> Path:
    """Sample, score and pair ``n_prompts`` of the run's training prompts with ``checkpoint``; resumable."""
    prompts = load_prompts(run["prompts"])
    chosen = random.Random(seed).sample(prompts, min(n_prompts, len(prompts)))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "prompts.parquet").exists():
        write_manifest(out / "prompts.parquet", [dict(prompt_id=i, prompt=p) for i, p in chosen], "prompts")
    samples = run_sample(SampleConfig(prompts=str(out / "prompts.parquet"), out=str(out), adapter=str(checkpoint),
                                      candidates=candidates, seed=seed, device="cpu", model=run["model"],
                                      batch_size=16))  # fmt: skip
    scores = run_score(ScoreConfig(samples=str(samples), out=str(out / "scores.parquet"), reward=run["reward"],
                                   device="cpu"))  # fmt: skip
    pairing = dict(dimension=run.get("reward_dimension", "overall"), strategy=run.get("pair_strategy", "all"),
                   min_margin=run.get("min_margin", 0.02))  # fmt: skip
    return run_pair(PairConfig(samples=str(samples), scores=str(scores), out=str(out / "pairs.parquet"), **pairing))


def pair_gradients(trainer, cfg: DpoConfig, pairs_path: Path, rows: list[dict], draws: int, cache: Path, seed: int):
    """One flattened gradient per pair of ``rows``, each the mean over ``draws`` timesteps and noises: ``[N, D]``."""
    b = trainer.backend
    x0_w, x0_l = load_pair_latents(pairs_path, rows, b, cache)
    grads = []
    for i, row in enumerate(rows):
        cond = b.condition([row["prompt"]] * draws)
        seeds = [seed * 1_000_003 + 2 * (i * draws + d) for d in range(draws)]
        x_w, x_l = (x[i : i + 1].expand(draws, *x.shape[1:]) for x in (x0_w, x0_l))
        pair_loss(b, trainer.denoiser, x_w, x_l, cond, seeds, cfg, "ref").loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]).clone())
        for p in trainer.params:
            p.grad = None
    return torch.stack(grads)


def per_prompt(g: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt: the sum of its pairs' gradients ``[P, D]``, its number of pairs and their summed squared norms."""
    names = sorted(set(prompts))
    index = torch.tensor([names.index(x) for x in prompts])
    zeros = torch.zeros(len(names), dtype=torch.float64)
    return (torch.zeros(len(names), g.shape[1], dtype=torch.float64).index_add_(0, index, g.double()),
            zeros.index_add(0, index, torch.ones(len(prompts), dtype=torch.float64)),
            zeros.index_add(0, index, (g.double() ** 2).sum(1)))  # fmt: skip


def figures(fresh: tuple, offline: tuple, batch: int) -> dict:
    """From either set's :func:`per_prompt` sums: the signal shares and the noise-free cosine (see the module
    docstring)."""
    (sf, nf, qf), (so, no) = fresh, offline[:2]
    tf, to = sf.sum(0), so.sum(0)

    def signal(s, n):  # unbiased |mu|^2 from the dot products of different prompts' pairs
        total = s.sum(0)
        return float((total @ total - (s * s).sum()) / (n.sum() ** 2 - (n * n).sum()))

    mf, mo = signal(sf, nf), signal(so, no)
    ef, eo = float(qf.sum() / nf.sum()), float(offline[2].sum() / no.sum())  # E|g|^2
    cross = float(tf @ to / (nf.sum() * no.sum()))

    def step(m, e):  # the signal share of a mean over ``batch`` independent pairs
        return m / (m + (e - m) / batch)

    return {"signal_pair_fresh": mf / ef, "signal_pair_offline": mo / eo, "signal_step_fresh": step(mf, ef),
            "signal_step_offline": step(mo, eo), "cos": cross / math.sqrt(mf * mo) if min(mf, mo) > 0 else math.nan,
            "raw_cos": float(tf @ to / (tf.norm() * to.norm()))}  # fmt: skip


def jackknife(fresh: tuple, offline: tuple, batch: int) -> tuple[dict, dict]:
    """The figures from ``(gradients, prompt ids)`` of either set, and their standard errors from leaving out one
    prompt at a time (the two sets are independent: their jackknife variances add)."""
    sets = [per_prompt(*fresh), per_prompt(*offline)]
    full = figures(*sets, batch)
    variance = dict.fromkeys(full, 0.0)
    for which, parts in enumerate(sets):
        m = len(parts[1])
        leave = []
        for k in range(m):
            kept = [tuple(x[torch.arange(m) != k] for x in parts) if i == which else s for i, s in enumerate(sets)]
            leave.append(figures(*kept, batch))
        for key in full:
            values = torch.tensor([x[key] for x in leave], dtype=torch.float64)
            variance[key] += float((m - 1) / m * ((values - values.mean()) ** 2).sum())
    return full, {k: math.sqrt(v) for k, v in variance.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints/step-N folders")
    ap.add_argument("--offline", type=Path, required=True, help="an offline run's pairs.parquet (base videos)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the fresh samples and figures.parquet")
    ap.add_argument("--prompts", type=int, default=64, help="training prompts each checkpoint samples afresh")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--draws", type=int, default=4, help="timesteps and noises per pair's gradient")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step, for signal/step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    offline = read_manifest(args.offline, "pairs").to_pylist()
    results = []
    table = ["| checkpoint | pairs fresh / offline | signal/pair fresh | offline | signal/step fresh | offline "
             "| cos(fresh, offline) | raw cos |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    print(*table, sep="\n")
    for checkpoint in args.checkpoints:
        run = run_settings(checkpoint)
        name = f"{checkpoint.parent.parent.name}-{checkpoint.name}"
        fresh_path = fresh_pairs(checkpoint, run, args.out / name, args.prompts, args.candidates, args.seed)
        fresh = read_manifest(fresh_path, "pairs").to_pylist()
        n = min(len(fresh), len(offline))
        rng = random.Random(args.seed)
        fresh, off = rng.sample(fresh, n), rng.sample(offline, n)
        cfg = DpoConfig(out=str(args.out / name / "trainer"), pairs="-", init_adapter=str(checkpoint),
                        lora_rank=run["lora_rank"], beta=run.get("beta"), device="cpu",
                        model=run["model"])  # fmt: skip
        trainer = setup(cfg, extra_adapters=("ref",))
        copy_adapter(trainer.denoiser, "default", "ref")
        cache = args.out / name / "encoded"
        gf = pair_gradients(trainer, cfg, fresh_path, fresh, args.draws, cache, args.seed)
        go = pair_gradients(trainer, cfg, args.offline, off, args.draws, cache, args.seed + 1)
        full, err = jackknife((gf, [r["prompt_id"] for r in fresh]), (go, [r["prompt_id"] for r in off]), args.batch)
        results.append({"checkpoint": name, "pairs": n, **full, **{f"{k}_se": v for k, v in err.items()}})
        keys = ("signal_pair_fresh", "signal_pair_offline", "signal_step_fresh", "signal_step_offline", "cos")
        cells = [f"{full[k]:.3f} ± {err[k]:.3f}" for k in keys]
        table.append(f"| {name} | {n} | {' | '.join(cells)} | {full['raw_cos']:.3f} |")
        print(table[-1], flush=True)
    pq.write_table(pa.Table.from_pylist(results), args.out / "figures.parquet")
    (args.out / "figures.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
