"""How far a `vpotool loop` run's policy has moved from the base model, round by round, measured on the videos it
trained on.

Every round of an online run samples K videos per prompt from the current policy. For each round this script
samples the same prompts with the same seeds from the base model (the loop's sampler is deterministic given the
seed, so round 0, sampled by the base itself, comes back identical: a check of the method), scores both sets
with the run's reward, and prints:

- ``moved``: the mean absolute difference between the policy's latent and the base's from the same noise, in
  units of the mean difference between two of the base's candidates for one prompt (0: the policy samples what
  the base samples; 1: as far apart as two different seeds);
- ``gain``, ``win``: the policy's reward minus the base's from the same noise, and how often the policy's is
  higher;
- ``flipped``: of the round's preference pairs (chosen and rejected are two seeds), the share whose order the
  base's videos from those two seeds reverse: pairs an offline run, sampling once from the base, would have
  had the other way round. 0 means the online pairs teach what offline pairs from the same seeds teach;
  ``flipped_wide`` is the same share among the pairs whose reward margin is at least the round's median.

    python examples/tiny_world/movement.py RUN [RUN ...] [--out movement.parquet] [--every N]

Resumable: the base's videos go to RUN/movement/iter-N and are not sampled again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from vpotool.config import SampleConfig, ScoreConfig
from vpotool.latents import load_latents
from vpotool.manifest import read_manifest, resolve
from vpotool.stages.sample import run_sample
from vpotool.stages.score import run_score

SAMPLE_KEYS = ("model", "model_path", "model_options", "frames", "height", "width", "fps", "steps", "guidance",
               "noise_level", "sampler", "negative_prompt", "seed", "batch_size", "dtype")  # fmt: skip


def base_round(round_dir: Path, run: Path, loop: dict) -> tuple[Path, Path]:
    """The base model's samples and scores for ``round_dir``'s prompts and seeds, under RUN/movement."""
    settings = yaml.safe_load((round_dir / "sample.yaml").read_text())
    out = run / "movement" / round_dir.name
    cfg = SampleConfig(prompts=str(round_dir / "prompts.parquet"), out=str(out), candidates=settings["candidates"],
                       device="cpu", **{k: settings[k] for k in SAMPLE_KEYS})  # fmt: skip
    samples = run_sample(cfg)
    reward = dict(reward=loop["reward"], reward_path=loop["reward_path"], reward_options=loop["reward_options"])
    scores = run_score(ScoreConfig(samples=str(samples), out=str(out / "scores.parquet"), device="cpu", **reward))
    return samples, scores


def by_id(manifest: Path, stage: str) -> dict[str, dict]:
    return {row["sample_id"]: row for row in read_manifest(manifest, stage).to_pylist()}


def round_figures(round_dir: Path, run: Path, loop: dict) -> dict:
    base_samples, base_scores = base_round(round_dir, run, loop)
    dimension = loop["reward_dimension"]
    policy = by_id(round_dir / "samples.parquet", "samples")
    base = by_id(base_samples, "samples")
    policy_score = {k: r[dimension] for k, r in by_id(round_dir / "scores.parquet", "scores").items()}
    base_score = {k: r[dimension] for k, r in by_id(base_scores, "scores").items()}
    ids = sorted(policy)
    if set(ids) != set(base) or any(policy[i]["seed"] != base[i]["seed"] for i in ids):
        sys.exit(f"{round_dir}: the base's samples do not have the round's ids and seeds")
    ours = load_latents([resolve(round_dir / "samples.parquet", policy[i]["latent"]) for i in ids])
    theirs = load_latents([resolve(base_samples, base[i]["latent"]) for i in ids])
    shift = (ours - theirs).abs().flatten(1).mean(1)
    spread = []  # mean |difference| between two of the base's candidates of one prompt
    for prompt in {policy[i]["prompt_id"] for i in ids}:
        rows = [n for n, i in enumerate(ids) if policy[i]["prompt_id"] == prompt]
        spread += [(theirs[a] - theirs[b]).abs().mean() for a in rows for b in rows if a < b]
    gains = torch.tensor([policy_score[i] - base_score[i] for i in ids])
    pairs = read_manifest(round_dir / "pairs.parquet", "pairs").to_pylist()
    flipped = [base_score[p["chosen_id"]] < base_score[p["rejected_id"]] for p in pairs]
    wide = sorted(p["margin"] for p in pairs)[len(pairs) // 2] if pairs else 0.0  # the round's median margin
    flipped_wide = [f for f, p in zip(flipped, pairs, strict=True) if p["margin"] >= wide]
    return {
        "run": run.name,
        "round": int(round_dir.name.split("-")[-1]),
        "moved": float(shift.mean() / torch.stack(spread).mean()),
        "gain": float(gains.mean()),
        "win": float((gains > 0).float().mean()),
        "pairs": len(pairs),
        "flipped": sum(flipped) / max(len(pairs), 1),
        "flipped_wide": sum(flipped_wide) / max(len(flipped_wide), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the figures to this Parquet file")
    parser.add_argument("--every", type=int, default=1, help="measure every N-th round only (and the last)")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        loop = yaml.safe_load((run / "loop.yaml").read_text())
        rounds = sorted(d for d in run.glob("iter-*") if (d / "pairs.parquet").exists())
        for n, round_dir in enumerate(rounds):
            if n % args.every == 0 or n == len(rounds) - 1:
                rows.append(round_figures(round_dir, run, loop))
                r = rows[-1]
                print(f"{r['run']} round {r['round']:2d}: moved {r['moved']:.3f}  gain {r['gain']:+.4f}  "
                      f"win {r['win']:.2f}  flipped {r['flipped']:.2f} of {r['pairs']} pairs, "
                      f"{r['flipped_wide']:.2f} of the wider half", flush=True)  # fmt: skip
    if args.out:
        pq.write_table(pa.Table.from_pylist(rows), args.out)


if __name__ == "__main__":
    main()
