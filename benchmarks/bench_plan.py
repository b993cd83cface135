"""`vpotool plan` checked and used: its prediction against the measured peak of the same step on the CPU, and its
table for the published video models at their usual sizes (docs/benchmarks.md, "Planning a run").

``--validate``: for the tiny families, each trainer's own step function (train-dpo's ``dpo_step``, train-refl's
``refl_step``, train-scst's rollouts and ``scst_update``) runs for real under the CPU allocator's record (torch's
profiler, :func:`vpotool.memtrace.allocator_peak`), beside the plan of the same step; sizes, frames and gradient
checkpointing vary. ``--models``: the plan of one step of DPO (one pair), ReFL (K = 1, the reward on one frame or
all) and SCST (one rollout and its greedy baseline) on each config-only folder of examples/plan/configs, with bf16
weights and without, then with gradient checkpointing and the text encoder offloaded; no weights are read.

``--context-parallel``: DPO on the Wan 14B models at 480p and 720p with gradient checkpointing, the text encoder
offloaded and bf16 weights, planned for one process of a context group of N = 1, 2, 4 and 8 processes: its peak,
its activations, the bytes it sends to the group in the step and its share of the FLOPs.

    python benchmarks/bench_plan.py --validate
    python benchmarks/bench_plan.py --models
    python benchmarks/bench_plan.py --context-parallel
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "plan" / "configs"
CLIP = str(CONFIGS / "clip-vit-large-patch14")

# (label, --model, folder, frames, height, width): each family at a size its users run
MODELS = [
    ("Wan 2.1 T2V 1.3B, 480p x 81", "wan", "wan2.1-t2v-1.3b", 81, 480, 832),
    ("Wan 2.1 T2V 14B, 720p x 81", "wan", "wan2.1-t2v-14b", 81, 720, 1280),
    ("Wan 2.2 T2V A14B, 720p x 81", "wan", "wan2.2-t2v-a14b", 81, 720, 1280),
    ("CogVideoX 5B, 480x720 x 49", "cogvideox", "cogvideox-5b", 49, 480, 720),
    ("LTX-Video 2B, 512x704 x 161", "ltx", "ltx-video-2b", 161, 512, 704),
    ("Open-Sora 1.2, 720p x 68", "opensora", "opensora-v1.2", 68, 720, 1280),
    ("Open-Sora 1.2, 360p x 17", "opensora", "opensora-v1.2", 17, 360, 640),
    ("Open-Sora 1.2, 240p x 68", "opensora", "opensora-v1.2", 68, 240, 424),
]
METHODS = ["DPO", "ReFL, 1 frame", "ReFL, all frames", "SCST"]


def validate() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_plan import SIZES, pair_step, rollout_step
    from vpotool.memtrace import allocator_peak
    from vpotool.stages.plan import plan_stage
    from vpotool.training.config import DpoConfig, ReflConfig, ScstConfig

    print("| model | step | frames x height x width | gradient checkpointing | planned MiB | measured MiB | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    for model, sizes in SIZES.items():
        for kind in ("dpo", "refl", "scst"):
            for frames, height, width in sizes:
                for gc in (False, True):
                    with tempfile.TemporaryDirectory() as out:
                        common = dict(out=out, model=model, batch_size=2, device="cpu", lora_rank=8)
                        common["gradient_checkpointing"] = gc
                        if kind == "dpo":
                            cfg, extra = DpoConfig(pairs="-", **common), {"frames": frames, "height": height}
                            extra["width"] = width
                            measured = allocator_peak(pair_step(cfg, frames, height, width, Path(out)))
                        else:
                            video = dict(prompts="world:align", frames=frames, height=height, width=width, steps=2,
                                         reward="temporal")  # fmt: skip
                            cfg, extra = (ReflConfig if kind == "refl" else ScstConfig)(**common, **video), {}
                            measured = allocator_peak(rollout_step(cfg, kind))
                        planned = plan_stage(f"train-{kind}", cfg, extra, alternatives=False).step
                    mib, size = 2**20, f"{frames} x {height} x {width}"
                    print(f"| {model} | train-{kind} | {size} | {'yes' if gc else 'no'} | {planned / mib:.1f} | "
                          f"{measured / mib:.1f} | {planned / measured:.3f} |", flush=True)  # fmt: skip


def method_config(method: str, model: str, folder: str, frames: int, height: int, width: int, memory: bool):
    from vpotool.training.config import DpoConfig, ReflConfig, ScstConfig

    common = dict(out="plan", model=model, model_path=str(CONFIGS / folder), batch_size=1, dtype="bfloat16",
                  gradient_checkpointing=memory, offload_text_encoder=memory)  # fmt: skip
    video = dict(prompts="world:align", frames=frames, height=height, width=width, reward="clip", reward_path=CLIP)
    if method == "DPO":
        return "train-dpo", DpoConfig(pairs="-", **common), {"frames": frames, "height": height, "width": width}
    if method.startswith("ReFL"):
        cfg = ReflConfig(**common, **video, reward_frames="1" if "1 frame" in method else "all")
        return "train-refl", cfg, {}
    return "train-scst", ScstConfig(**common, **video, estimator="logp"), {}


def models(only: str | None) -> None:
    from vpotool.errors import VpoError
    from vpotool.gpus import GIB, HEADROOM
    from vpotool.stages.plan import plan_stage

    room = 80 * GIB - HEADROOM
    print("| model, size | method | bf16 weights | + gradient checkpointing, text encoder offloaded | of it: weights "
          "+ adapter | text encoder | activations | VAE | reward | planned in |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, model, folder, frames, height, width in MODELS:
        if only and only not in label:
            continue
        for method in METHODS:
            if model == "opensora" and method != "DPO" and frames == 68 and height == 720:
                continue  # OnlineVPO's figure: DPO at 720p x 68, ReFL at the smaller sizes
            if model == "opensora" and method == "DPO" and height < 720:
                continue
            t0, cells, parts = time.perf_counter(), [], None
            for memory in (False, True):
                stage, cfg, extra = method_config(method, model, folder, frames, height, width, memory)
                try:
                    plan = plan_stage(stage, cfg, extra, alternatives=False)
                except VpoError as e:
                    cells.append(f"refused: {e}")
                    continue
                mark = "" if plan.peak <= room else " (over 80 GB)"
                cells.append(f"{plan.peak / GIB:,.1f} GiB{mark}")
                parts = plan.parts
            p = {k: f"{v / GIB:,.1f}" for k, v in (parts or {}).items()}
            weights = (parts["weights"] + parts["adapters & optimizer"]) / GIB if parts else 0
            print(f"| {label} | {method} | {cells[0]} | {cells[1]} | {weights:,.1f} | {p.get('text encoder')} | "
                  f"{p.get('activations')} | {p.get('VAE')} | {p.get('reward model')} | "
                  f"{time.perf_counter() - t0:.0f} s |", flush=True)  # fmt: skip


# (label, folder, frames, height, width): the videos too long for one GPU's activations
LONG = [
    ("Wan 2.1 T2V 14B, 720p x 81", "wan2.1-t2v-14b", 81, 720, 1280),
    ("Wan 2.2 T2V A14B, 480p x 81", "wan2.2-t2v-a14b", 81, 480, 832),
    ("Wan 2.2 T2V A14B, 720p x 81", "wan2.2-t2v-a14b", 81, 720, 1280),
]


def context_parallel() -> None:
    from vpotool.gpus import GIB, HEADROOM
    from vpotool.stages.plan import plan_stage

    room = 80 * GIB - HEADROOM
    print("| model, size | N | peak per process | fits 80 GB | activations | weights + adapter | sent per step | "
          "TFLOP per process | planned in |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    found = {}
    for label, folder, frames, height, width in LONG:
        smallest = None
        for n in (1, 2, 4, 8):
            t0 = time.perf_counter()
            _, cfg, extra = method_config("DPO", "wan", folder, frames, height, width, memory=True)
            cfg.context_parallel = n
            plan = plan_stage("train-dpo", cfg, extra, alternatives=False)
            fits = plan.peak <= room
            smallest = smallest or (n if fits else None)
            parts = {k: f"{v / GIB:,.1f} GiB" for k, v in plan.parts.items()}
            weights = (plan.parts["weights"] + plan.parts["adapters & optimizer"]) / GIB
            print(f"| {label} | {n} | {plan.peak / GIB:,.1f} GiB | {'yes' if fits else 'no'} | "
                  f"{parts['activations']} | {weights:,.1f} GiB | {plan.exchanged / GIB:,.1f} GiB | "
                  f"{plan.flops / 1e12:,.0f} | {time.perf_counter() - t0:.0f} s |", flush=True)  # fmt: skip
        found[label] = smallest
    print("\n| model, size | smallest N on one 80 GB GPU each |\n|---|---:|")
    for label, n in found.items():
        print(f"| {label} | {n or 'none up to 8'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--validate", action="store_true", help="planned against measured on the CPU (tiny families)")
    ap.add_argument("--models", action="store_true", help="the published models' table")
    ap.add_argument("--only", help="with --models: only rows whose label contains this")
    ap.add_argument("--context-parallel", action="store_true", help="Wan 14B DPO over N = 1 to 8 processes")
    args = ap.parse_args()
    if args.validate:
        validate()
    if args.models:
        models(args.only)
    if args.context_parallel:
        context_parallel()


if __name__ == "__main__":
    main()
