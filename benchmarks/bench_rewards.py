"""Scoring throughput (videos/s) and peak memory per reward.

CPU (default): every reward, and the pairwise judge (a call: one video against the next), at a tiny random config
(the ones the tests build, from ``tests/tiny_rewards.py``; the generating ones write 24 tokens an answer),
each in a fresh process, scoring ``--repeats`` batches of ``--batch`` videos of ``--frames`` frames at
``--size`` x ``--size``. Peak memory is the process's peak resident memory minus its resident memory after the
libraries were imported (weights, activations and the video batch). The checkpoints are written by the parent
process, so the children only load and score. These figures compare the rewards' own overheads (preprocessing,
frame handling, RAFT's iterations) at toy model sizes, not their real costs, which the model sizes dominate: see
the memory column of docs/rewards.md.

    python benchmarks/bench_rewards.py [--rewards clip,raft] [--batch 4] [--frames 8] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FREE = ("world", "temporal", "flicker")
MODEL = ("videoscore", "clip", "pickscore", "aesthetic", "hpsv2", "background", "subject", "vjepa", "raft",
         "videoalign", "videoscore2")  # fmt: skip
JUDGES = ("unifiedreward-think",)  # pairwise: a call compares two videos (one order)
PROMPT = "a red circle moving left slowly on a black background"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(name: str, path: str, options: str, batch: int, frames: int, size: int, repeats: int, device: str) -> dict:
    """Load reward ``name`` and time ``repeats`` scoring calls, in this (fresh) process."""
    import torch

    # the model classes' code counts as libraries, not as the reward's memory: import it before the baseline
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.dinov2.modeling_dinov2  # noqa: F401
    import transformers.models.idefics2.modeling_idefics2  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401
    import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401
    import transformers.models.vjepa2.modeling_vjepa2  # noqa: F401

    import vpotool.rewards.clip  # noqa: F401
    import vpotool.rewards.features  # noqa: F401
    import vpotool.rewards.raft  # noqa: F401
    import vpotool.rewards.unifiedreward  # noqa: F401
    import vpotool.rewards.videoalign  # noqa: F401
    import vpotool.rewards.videoscore  # noqa: F401
    import vpotool.rewards.videoscore2  # noqa: F401
    from vpotool.options import parse_pairs
    from vpotool.rewards import load_reward
    from vpotool.rewards.unifiedreward import load_judge

    torch.manual_seed(0)
    base = rss_mb()
    if name in JUDGES:
        judge = load_judge(name, path, device, options=parse_pairs(options, "options", ""))
        reward = judge
        score = lambda v, p: [judge.judge(v[i], v[(i + 1) % len(v)], p[i], (8, 8)) for i in range(len(v))]  # noqa: E731
    else:
        reward = score = load_reward(name, path or None, device, options=options)
    videos = torch.rand(batch, frames, 3, size, size, device=device)
    prompts = [PROMPT] * batch
    with torch.no_grad():
        score(videos, prompts)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            score(videos, prompts)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    params = sum(p.numel() for m in vars(reward).values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    return {"videos_s": batch * repeats / seconds, "peak_mb": peak, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rewards", default=",".join(WEIGHT_FREE + MODEL + JUDGES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, path, options = args.one
        print(json.dumps(one(name, path, options, args.batch, args.frames, args.size, args.repeats, args.device)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_rewards import save_tiny_reward

    from vpotool.models.loading import quiet_loading

    quiet_loading()
    tmp = tempfile.TemporaryDirectory()
    sizes = ["--batch", str(args.batch), "--frames", str(args.frames), "--size", str(args.size)]
    flags = [*sizes, "--repeats", str(args.repeats), "--device", args.device]
    print(
        f"reward scoring: tiny random configs, {args.device}, batches of {args.batch} videos x {args.frames} frames "
        f"{args.size}x{args.size}, {args.repeats} calls after a warm-up, each reward in a fresh process\n"
    )
    print("| reward | parameters | videos/s | peak MB |")
    print("|---|---:|---:|---:|")
    for name in args.rewards.split(","):
        path, options = save_tiny_reward(name, Path(tmp.name)) if name in MODEL + JUDGES else ("", "")
        cmd = [sys.executable, __file__, "--one", name, path, options, *flags]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['params']:,} | {r['videos_s']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
