"""Peak memory of a video's denoising against its length: the autoregressive ``tiny-ar`` rollout against the
bidirectional ``tiny`` model sampling all frames at once, at 1x, 2x and 4x the 17-frame training length.

Each (model, frames) runs in a fresh process that loads the model, then samples a batch with the default settings;
the table reports the process's peak resident memory growth during sampling (``ru_maxrss`` after minus before),
the widest denoiser input in latent frames, and the time. On CPU the allocator's peak is the process's.

    python benchmarks/bench_rollout_memory.py [--batch 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from vpotool.models import load_backend
from vpotool.stages.sample import generate
model, frames, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_flush_denormal(True)
b = load_backend(model)
widest = []
predict = b.predict
b.predict = lambda x, t, c: widest.append(x.shape[2]) or predict(x, t, c)
settings = dict(frames=frames, height=32, width=32, steps=steps, guidance=4.0, noise_level=0.0)
prompts = ["a red circle moving left quickly on a black background"] * batch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with torch.no_grad():
    generate(b, prompts, list(range(batch)), settings)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (peak - before) / 1024, "widest": max(widest), "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"batch {args.batch}, {args.steps} steps, 32x32, guidance 4 (both branches batched)")
    head = f"{'model':8s} {'frames':>6s} {'x train':>7s} {'widest input':>13s} {'peak growth MiB':>16s}"
    print(f"{head} {'seconds':>8s}")
    for model in ("tiny", "tiny-ar"):
        for frames in (17, 33, 65):
            cmd = [sys.executable, "-c", CHILD, model, str(frames), str(args.batch), str(args.steps)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(f"{model:8s} {frames:6d} {frames // 16:6d}x {out['widest']:10d} lf {out['growth_mib']:16.1f} "
                  f"{out['seconds']:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
