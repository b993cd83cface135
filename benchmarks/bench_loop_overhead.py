"""What one ``vpotool loop`` iteration costs over its parts, and what keeping the models resident saves.

Three ways to run the same online DPO iteration (same prompts, seeds, settings, steps) on the tiny model:

- **parts**: the work alone, in memory: sample the candidates (vpotool's sampler, decode to frames), score them
  with the reward, pick best and worst per prompt, take the DPO steps on those latents. No files at all.
- **loop**: ``run_loop``; one iteration's cost is the difference between a run of ``1 + N`` iterations and a run
  of 1 (so the one-off model load and trainer setup cancel), divided by N. It includes everything the loop adds:
  the four manifests, mp4s and latent files, checkpoints and metrics.
- **cli**: the iteration as separate processes, as a shell script would chain them: ``vpotool sample``,
  ``score``, ``pair``, ``train-dpo``; each loads its model again.

Runs are repeated; the table shows medians, and the ratios come from this one run.

    python benchmarks/bench_loop_overhead.py [--iterations 2] [--repeats 2] [--skip-cli]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS, CANDIDATES, STEPS_PER_ITER = 8, 4, 8


def loop_config(out: Path, iterations: int, **kw):
    from vpotool.training.config import LoopConfig

    return LoopConfig(
        out=str(out), iterations=iterations, prompts_per_iter=PROMPTS, candidates=CANDIDATES,
        steps_per_iter=STEPS_PER_ITER, eval_prompts="none", device="cpu", **kw,
    )  # fmt: skip


def time_loop(tmp: Path, iterations: int) -> float:
    """Seconds per iteration of ``run_loop``, setup cancelled out (see the module docstring)."""
    from vpotool.stages.loop import run_loop

    times = []
    for n in (1, 1 + iterations):
        out = tmp / f"loop-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run_loop(loop_config(out, n))
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / iterations


def time_parts(iterations: int) -> float:
    """Seconds per iteration of the same work done directly in memory, after a setup that is not timed."""
    from vpotool.config import sub_config
    from vpotool.prompts import load_prompts
    from vpotool.rewards import load_reward
    from vpotool.sampling import resolved_settings
    from vpotool.stages.common import video_seed
    from vpotool.stages.loop import iteration_prompts, sampling
    from vpotool.stages.sample import generate
    from vpotool.training.common import batch_indices, optimizer_step, setup
    from vpotool.training.config import DpoConfig
    from vpotool.training.dpo import init_reference, pair_loss, reference_adapters
    from vpotool.training.lora import copy_adapter

    cfg = loop_config(Path(tempfile.mkdtemp(prefix="vpotool-parts-")), iterations)
    dcfg = sub_config(DpoConfig, cfg, pairs="in-memory", save_every=0)
    extra = reference_adapters(dcfg)
    trainer = setup(dcfg, None, extra)
    b, den = trainer.backend, trainer.denoiser
    reward = load_reward(cfg.reward, device=b.device)
    ref_mode = init_reference(trainer, dcfg)
    settings = {**resolved_settings(cfg, b), "noise_level": 0.0}
    prompts = load_prompts(cfg.prompts)

    t0, step = time.perf_counter(), 0
    for it in range(iterations):
        chosen = iteration_prompts(prompts, cfg, it)
        seed = cfg.seed * 100_003 + it
        jobs = [(pid, text, k) for pid, text in chosen for k in range(cfg.candidates)]
        latents, scores = [], []
        with sampling(trainer):
            for s in range(0, len(jobs), cfg.sample_batch_size):
                batch = jobs[s : s + cfg.sample_batch_size]
                texts = [t for _, t, _ in batch]
                lat, frames = generate(b, texts, [video_seed(seed, p, k) for p, _, k in batch], settings)
                with torch.no_grad():
                    scores.append(reward(frames, texts)[cfg.reward_dimension].float().cpu())
                latents.append(lat.float().cpu())
        lat, sc = torch.cat(latents), torch.cat(scores)
        per_prompt = sc.view(len(chosen), cfg.candidates)
        base = torch.arange(len(chosen)) * cfg.candidates
        x_w, x_l = lat[base + per_prompt.argmax(1)], lat[base + per_prompt.argmin(1)]
        texts = [t for _, t in chosen]
        for _ in range(cfg.steps_per_iter):
            idx = batch_indices(len(texts), dcfg.batch_size, step, dcfg.seed)
            cond = b.encode_prompts([texts[i] for i in idx])
            seeds = [dcfg.seed * 7_919 + 2 * (step * dcfg.batch_size + j) for j in range(len(idx))]
            out = pair_loss(b, den, x_w[idx].to(b.device), x_l[idx].to(b.device), cond, seeds, dcfg, ref_mode)
            trainer.accelerator.backward(out.loss)
            optimizer_step(trainer, dcfg)
            step += 1
            if dcfg.ref_update_interval and step % dcfg.ref_update_interval == 0:
                copy_adapter(den, "default", "ref")
    return (time.perf_counter() - t0) / iterations


def time_cli(tmp: Path) -> float:
    """Seconds for one iteration chained as four ``vpotool`` processes (each loads its own model)."""
    from vpotool.manifest import write_manifest
    from vpotool.prompts import load_prompts
    from vpotool.stages.loop import iteration_prompts

    cfg = loop_config(tmp / "unused", 1)
    d = tmp / "cli"
    shutil.rmtree(d, ignore_errors=True)
    rows = [dict(prompt_id=p, prompt=t) for p, t in iteration_prompts(load_prompts(cfg.prompts), cfg, 0)]
    write_manifest(d / "prompts.parquet", rows, "prompts", {"iteration": 0})
    exe = [sys.executable, "-m", "vpotool"]
    stages = [
        ["sample", "--prompts", d / "prompts.parquet", "--candidates", CANDIDATES, "--out", d,
         "--batch-size", cfg.sample_batch_size, "--seed", 0, "--device", "cpu"],
        ["score", "--samples", d / "samples.parquet", "--reward", cfg.reward, "--out", d / "scores.parquet"],
        ["pair", "--samples", d / "samples.parquet", "--scores", d / "scores.parquet", "--out", d / "pairs.parquet"],
        ["train-dpo", "--pairs", d / "pairs.parquet", "--out", d / "train", "--max-steps", STEPS_PER_ITER,
         "--lr", cfg.lr, "--lora-rank", cfg.lora_rank, "--beta", cfg.beta, "--batch-size", cfg.batch_size,
         "--ref-update-interval", cfg.ref_update_interval, "--device", "cpu"],
    ]  # fmt: skip
    t0 = time.perf_counter()
    for args in stages:
        subprocess.run(exe + [str(a) for a in args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2, help="extra loop iterations timed per repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()

    from vpotool.models.loading import quiet_loading

    quiet_loading()
    tmp = Path(tempfile.mkdtemp(prefix="vpotool-bench-loop-"))
    results: dict[str, list[float]] = {"parts": [], "loop": [], "cli": []}
    for r in range(args.repeats):
        results["parts"].append(time_parts(args.iterations))
        results["loop"].append(time_loop(tmp, args.iterations))
        if not args.skip_cli:
            results["cli"].append(time_cli(tmp))
        print(f"repeat {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}s" for k, v in results.items() if v), flush=True)

    med = {k: statistics.median(v) for k, v in results.items() if v}
    print(f"\none online DPO iteration on the tiny model: {PROMPTS} prompts x {CANDIDATES} candidates, "
          f"{STEPS_PER_ITER} DPO steps, {torch.get_num_threads()} threads, median of {args.repeats}\n")  # fmt: skip
    print("| way | seconds per iteration | vs parts |")
    print("|---|---:|---:|")
    for k in med:
        print(f"| {k} | {med[k]:.2f} | {med[k] / med['parts']:.3f}x |")
    print(f"\nloop overhead over its parts: {100 * (med['loop'] / med['parts'] - 1):+.1f}% (target < 10%)")
    if "cli" in med:
        print(f"separate CLI stages vs loop: {med['cli'] / med['loop']:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
