"""How much the ``sample`` stage adds on top of sampling: manifests, mp4 encoding, latent files, bookkeeping.

Times ``run_sample`` (the stage, with the model already loaded) against the same work done directly in memory:
encode prompts, run vpotool's sampler, decode to frames; same prompts, seeds, settings and batches. Runs are
interleaved and repeated; the table reports medians and the overhead ratio measured in this one run.

    python benchmarks/bench_sample_overhead.py [--prompts 8] [--candidates 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from vpotool.config import SampleConfig
    from vpotool.models import load_backend
    from vpotool.prompts import load_prompts
    from vpotool.sampling import resolved_settings
    from vpotool.stages.common import video_seed
    from vpotool.stages.sample import generate, run_sample

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    backend = load_backend("tiny")
    tmp = Path(tempfile.mkdtemp(prefix="vpotool-bench-"))
    prompt_file = tmp / "prompts.txt"
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square"]
    prompt_file.write_text(
        "\n".join(f"a {colours[i % 4]} {shapes[i % 2]} moving left on a black background" for i in range(args.prompts))
    )

    def cfg(out: Path) -> SampleConfig:
        return SampleConfig(
            prompts=str(prompt_file), out=str(out), candidates=args.candidates, steps=args.steps,
            batch_size=args.batch_size, device="cpu",
        )  # fmt: skip

    def direct() -> float:
        c = cfg(tmp / "unused")
        settings = resolved_settings(c, backend)
        jobs = [(pid, text, k) for pid, text in load_prompts(c.prompts) for k in range(c.candidates)]
        per_call = max(c.batch_size // c.candidates, 1) * c.candidates
        t0 = time.perf_counter()
        for s in range(0, len(jobs), per_call):
            batch = jobs[s : s + per_call]
            generate(backend, [t for _, t, _ in batch], [video_seed(c.seed, p, k) for p, _, k in batch], settings)
        return time.perf_counter() - t0

    def stage(i: int) -> float:
        t0 = time.perf_counter()
        run_sample(cfg(tmp / f"run{i}"), backend=backend)
        return time.perf_counter() - t0

    direct()  # warm-up
    d, s = [], []
    for i in range(args.repeats):
        d.append(direct())
        s.append(stage(i))
    md, ms = statistics.median(d), statistics.median(s)
    n = args.prompts * args.candidates
    threads = torch.get_num_threads()
    print(f"sample stage overhead: tiny model, CPU ({threads} threads), {n} videos ({args.prompts} prompts x ", end="")
    print(f"{args.candidates}), {args.steps} steps, 16 frames 32x32, {args.repeats} repeats")
    print()
    print("| path | median s | videos/s |")
    print("|---|---|---|")
    print(f"| direct (encode + sampler + decode, in memory) | {md:.2f} | {n / md:.2f} |")
    print(f"| `sample` stage (+ mp4, latents, manifest) | {ms:.2f} | {n / ms:.2f} |")
    print()
    print(f"overhead ratio: {ms / md:.3f} ({100 * (ms / md - 1):+.1f}% of sampling time)")


if __name__ == "__main__":
    main()
