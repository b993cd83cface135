"""GPU figures at real model size: a Wan 2.1 T2V 1.3B-architecture model with random weights, sampling and training
through vpotool's own code on the one GPU it finds.

Nothing is downloaded. The transformer and the VAE are diffusers' ``WanTransformer3DModel`` and ``AutoencoderKLWan``
built in code from the published Wan 2.1 T2V 1.3B configs (``WAN_1_3B`` below), saved in the diffusers layout and
loaded back in bf16 through ``--model wan``'s own loader. The text encoder is a one-layer stand-in of UMT5-XXL's width,
so prompt embeddings are random tensors of 512 tokens x 4096 (the real encoder, 5.7B parameters, would add its 11 GB
of bf16 weights wherever it is placed). Parts, chosen with ``--only``:

- sampling: seconds per denoising step and per video (the steps plus the VAE decode) with guidance on, vpotool's
  sampler (``vpotool.sampling.sample`` over the Wan backend) against diffusers' ``WanPipeline`` on the same modules,
  prompt embeddings, initial noise and settings; the pipeline gets an Euler flow scheduler with the backend's shift,
  so both take the same steps;
- training: peak GPU memory and seconds per optimizer step, without and with gradient checkpointing, of plain LoRA
  fine-tuning (the flow-matching loss on a pair's two latents), a train-dpo step (reference: the adapter disabled),
  train-refl with K = 1 on one decoded frame and on all frames, and a train-scst step (stochastic rollout, greedy
  baseline, update on every step), each through vpotool's own step functions on a fresh copy of the denoiser;
- mfu: model FLOPs utilisation of the DPO step, FLOPs counted from the config (:func:`forward_flops`), against the
  GPU's dense bf16 peak (``--peak-tflops`` overrides it);
- loop: one ``vpotool loop`` iteration against its parts, with benchmarks/bench_loop_overhead.py's functions at this
  model and size (run last, so the other parts have warmed the GPU up).

Every case runs alone: memory freed and peak statistics reset before it; an out-of-memory error is caught and shows
as OOM in its table cell. The defaults are sized for a few minutes on an H100. ``--smoke`` runs the same code on
tiny configs of the same classes on the CPU in seconds (memory figures are then n/a).

    python benchmarks/bench_gpu.py [--frames 33 --height 480 --width 832] [--only sampling,training,mfu,loop]
    python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/config.json and vae/config.json (the VAE's latents_mean and
# latents_std are diffusers' defaults, which are the published values), the 480p scheduler's flow_shift, and UMT5-XXL's
# width and prompt length. The text encoder keeps that width but one layer with a narrow feed-forward.
WAN_1_3B = {
    "transformer": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    "vae": dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    ),
    "text_encoder": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=256, num_layers=1),
    "text_len": 512,
    "shift": 3.0,
}  # fmt: skip
# The same classes at a tiny size, for --smoke.
TINY = {
    "transformer": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    ),
    "vae": dict(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ),
    "text_encoder": dict(d_model=32, d_kv=16, num_heads=2, d_ff=32, num_layers=1),
    "text_len": 16,
    "shift": 3.0,
}  # fmt: skip
# Defaults of the full run and of --smoke; flags override them.
RUNS = {
    "full": dict(frames=33, height=480, width=832, sample_steps=10, rollout_steps=4, repeats=2,
                 dtype="bfloat16", mixed_precision="bf16"),
    "smoke": dict(frames=9, height=32, width=32, sample_steps=2, rollout_steps=2, repeats=1,
                  dtype="float32", mixed_precision="no"),
}  # fmt: skip
PARTS = ("sampling", "training", "mfu", "loop")
METHODS = {
    "lora": "plain LoRA fine-tuning (flow-matching loss, the pair's 2 latents)",
    "dpo": "train-dpo (reference: adapter disabled)",
    "refl-1": "train-refl K=1, one decoded frame",
    "refl-all": "train-refl K=1, all frames decoded",
    "scst": "train-scst (stochastic rollout + greedy baseline)",
}
PROMPTS = ["a red circle moving left on a black background", "a blue square moving up slowly"]
REWARD = "brightness"  # weight-free and differentiable, works on one frame: the figures are the video model's own
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched in order against the device name.
OOM = "OOM"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fresh(device: torch.device) -> None:
    """Free what nothing references any more and reset the peak memory statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last :func:`fresh` (GiB); None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def isolated(fn, device: torch.device):
    """``fn()`` alone: memory freed and peak statistics reset before and after it; running out of GPU memory
    returns ``OOM`` instead of raising."""
    fresh(device)
    try:
        result = fn()
    except torch.cuda.OutOfMemoryError:
        result = OOM
    fresh(device)  # after the except block: the error's frames (and their tensors) are gone by now
    return result


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else format(value, spec)


def forward_flops(t: dict, latent_shape: tuple[int, ...], text_len: int) -> tuple[float, float]:
    """Matmul FLOPs (2 per multiply-add) of one ``WanTransformer3DModel`` forward on one latent ``(C, F, h, w)`` with
    ``text_len`` prompt tokens, as ``(linear, attention)``; ``t`` is the transformer's config.

    Linear: the patch embedding; the text (text_dim -> d -> d) and time (freq -> d -> d -> 6d) embedders; per block
    the self-attention's q, k, v, out and the cross-attention's q, out on the s video tokens, its k, v on the text
    tokens, and the feed-forward; the output projection. Attention: QK^T and PV of self-attention (s x s) and
    cross-attention (s x text_len). Norms, RoPE, modulation and softmax are elementwise and left out."""
    c, f, h, w = latent_shape
    pt, ph, pw = t["patch_size"]
    s, patch = (f // pt) * (h // ph) * (w // pw), pt * ph * pw
    d = t["num_attention_heads"] * t["attention_head_dim"]
    block = 2 * (6 * s * d * d + 2 * text_len * d * d + 2 * s * d * t["ffn_dim"])
    embed = 2 * (s * c * patch * d + text_len * (t["text_dim"] + d) * d + (t["freq_dim"] + 7 * d) * d)
    embed += 2 * s * d * t["out_channels"] * patch
    attention = 2 * 2 * (s * s + s * text_len) * d
    return t["num_layers"] * block + embed, t["num_layers"] * attention


def dpo_step_flops(t: dict, latent_shape: tuple[int, ...], text_len: int, pairs: int) -> float:
    """Model FLOPs of one DPO optimizer step on ``pairs`` pairs: per latent (2 a pair) the policy's forward, its
    backward to the inputs (the frozen weights take no weight gradients; LoRA's are negligible: 1x the linear and
    2x the attention FLOPs of a forward) and the reference's forward. Recomputation under gradient checkpointing
    is not counted, as model FLOPs utilisation does not count it."""
    linear, attention = forward_flops(t, latent_shape, text_len)
    return 2 * pairs * (3 * linear + 4 * attention)


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its device name (`vpotool plan`'s table), or None when it does not know it."""
    from vpotool.gpus import known_tflops

    known = known_tflops(name)
    return known[0] if known else None


def build_checkpoint(folder: Path, spec: dict, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Random parts of ``spec`` saved in the diffusers layout that ``--model wan`` loads (transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/ with the published UniPC flow scheduler). Returns parameter counts."""
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from vpotool.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(spec["text_len"])
    text_cfg = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                          **spec["text_encoder"])  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: seconds on a GPU
        parts = {
            "transformer": WanTransformer3DModel(**spec["transformer"]),
            "vae": AutoencoderKLWan(**spec["vae"]),
            "text_encoder": UMT5EncoderModel(text_cfg),
        }
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the float32 modules' warning: loading in bf16 restores them
    try:
        for name, module in parts.items():
            module.to(dtype).save_pretrained(folder / name)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec["shift"])  # fmt: skip
    scheduler.save_pretrained(folder / "scheduler")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


def bench_sampling(b, args) -> dict[str, list]:
    """Per sampler, per repeat: ``(s per denoising step, s per video, s of VAE decode, peak GiB)`` or ``OOM``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from vpotool.sampling import sample, seeded_noise

    dev = b.device
    cond, uncond = b.encode_prompts(PROMPTS[:1]), b.encode_negative(1)
    noise = seeded_noise(b.latent_shape(args.frames, args.height, args.width), [0], dev)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=b.codec.vae, transformer=b.denoiser,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=b.shift))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def vpotool_run(steps: int) -> tuple[float, float]:
        t0 = clock(dev)
        traj = sample(b, cond, noise, steps=steps, guidance=args.guidance, uncond=uncond)
        t1 = clock(dev)
        b.decode(traj.latents.to(b.dtype))
        return t1 - t0, clock(dev) - t0

    def pipeline_run(steps: int) -> tuple[float, float]:
        marks = []

        def at_step_end(pipe, i, t, tensors):
            if i == steps - 1:
                marks.append(clock(dev))
            return {}

        t0 = clock(dev)
        pipe(
            prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=uncond["encoder_hidden_states"],
            height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps,
            guidance_scale=args.guidance, latents=noise, output_type="pt", callback_on_step_end=at_step_end,
        )  # fmt: skip
        return marks[0] - t0, clock(dev) - t0

    def measured(run):
        loop, video = run(args.sample_steps)
        return loop / args.sample_steps, video, video - loop, peak_gib(dev)

    runs = {"vpotool": vpotool_run, "WanPipeline": pipeline_run}
    for name, run in runs.items():
        log(f"sampling: warm-up {name}")
        isolated(lambda run=run: run(2), dev)
    results = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, run in runs.items():
            log(f"sampling: {name}, repeat {r + 1}/{args.repeats}")
            results[name].append(isolated(lambda run=run: measured(run), dev))
    return results


def method_config(method: str, checkpointing: bool, args, out: Path):
    """The trainer config ``method`` runs under (the command's defaults, this run's size and precision)."""
    from vpotool.training.config import DpoConfig, ReflConfig, ScstConfig, TrainConfig

    common = dict(
        out=str(out), model="wan", device=args.device, dtype=args.dtype, mixed_precision=args.mixed_precision,
        gradient_checkpointing=checkpointing, batch_size=args.batch, lora_rank=args.lora_rank,
    )  # fmt: skip
    if method == "lora":
        return TrainConfig(**common)
    if method == "dpo":
        return DpoConfig(pairs="in-memory", **common)
    rollout = dict(prompts="in-memory", reward=REWARD, frames=args.frames, height=args.height, width=args.width,
                   steps=args.rollout_steps, guidance=args.guidance)  # fmt: skip
    if method == "scst":
        return ScstConfig(**common, **rollout, estimator="logp")
    return ReflConfig(backprop_steps=1, reward_frames="1" if method == "refl-1" else "all", **common, **rollout)


def lora_step(trainer, cfg, x0: torch.Tensor, cond: dict, step: int) -> None:
    """One optimizer step of plain LoRA fine-tuning: the flow-matching loss on latents ``x0 [N, C, F, h, w]``, as the
    policy half of a DPO step computes it."""
    from vpotool.losses import per_sample_mse
    from vpotool.sampling import seeded_noise, training_target
    from vpotool.training.common import optimizer_step

    b, shape, n = trainer.backend, tuple(x0.shape[1:]), len(x0)
    sched = b.training_timesteps(n, torch.Generator().manual_seed(step), shape)
    noise = seeded_noise(shape, [step * n + j for j in range(n)], x0.device)
    a, s = (v.to(x0.device).view(-1, 1, 1, 1, 1) for v in (sched.alphas, sched.sigmas))
    pred = b.predict((a * x0 + s * noise).to(b.dtype), sched.timesteps.to(x0.device), cond)
    loss = per_sample_mse(pred, training_target(b.prediction, x0, noise, a, s)).mean()
    trainer.accelerator.backward(loss)
    optimizer_step(trainer, cfg)


def method_step(method: str, trainer, cfg, args, tmp: Path):
    """``step(i)``: optimizer step ``i`` of ``method`` through vpotool's own step functions."""
    from vpotool.latents import save_latent
    from vpotool.training.dpo import dpo_step
    from vpotool.training.refl import refl_step
    from vpotool.training.reward import load_rollout_reward
    from vpotool.training.scst import fresh_batches, scst_update

    b = trainer.backend
    shape = b.latent_shape(args.frames, args.height, args.width)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    if method == "lora":
        x0 = torch.randn(2 * args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(b.device)
        cond = b.encode_prompts(prompts * 2)
        return lambda i: lora_step(trainer, cfg, x0, cond, i)
    if method == "dpo":  # latents read from files each step, as train-dpo reads the pairs' latents
        files = [(tmp / f"chosen-{j}.safetensors", tmp / f"rejected-{j}.safetensors") for j in range(args.batch)]
        for path in (p for pair in files for p in pair):
            save_latent(path, torch.randn(shape), {"sample_id": path.stem})
        rows = [{"prompt": p} for p in prompts]
        return lambda i: dpo_step(trainer, cfg, rows, files, i, "base")
    settings = dict(frames=args.frames, height=args.height, width=args.width, steps=args.rollout_steps,
                    guidance=args.guidance, noise_level=getattr(cfg, "noise_level", 0.0),
                    fps=b.defaults.fps)  # fmt: skip
    reward = load_rollout_reward(cfg, b.device, need_grad=method != "scst")
    if method.startswith("refl"):  # refl-1: train-refl decodes only the first latent frame (Wan's VAE is causal)
        return lambda i: refl_step(trainer, cfg, reward, PROMPTS, settings, i)
    sched = b.schedule(settings["steps"], shape)
    return lambda i: scst_update(
        trainer, cfg, fresh_batches(trainer, cfg, reward, PROMPTS, settings, i), sched, settings, clipped=False
    )


def planned_gib(method: str, checkpointing: bool, args, folder: Path) -> float | None:
    """What `vpotool plan` predicts for the same step on the same folder (configs only), in GiB: the prediction the
    measured peak checks. None for plain LoRA fine-tuning, which is no stage of vpotool's."""
    import dataclasses

    from vpotool.stages.plan import plan_stage

    if method == "lora":
        return None
    cfg = method_config(method, checkpointing, args, folder.parent / "plan")
    changes = {"model_path": str(folder)} | ({} if method == "dpo" else {"prompts": "world:align"})
    size = {"frames": args.frames, "height": args.height, "width": args.width} if method == "dpo" else {}
    return plan_stage(f"train-{method.split('-')[0]}", dataclasses.replace(cfg, **changes), size, False).peak / 2**30


def train_case(b, pristine, method: str, checkpointing: bool, args, tmp: Path) -> tuple[float, float | None]:
    """Median seconds per optimizer step (after ``args.warmup`` untimed steps) and peak GiB of ``method`` with a
    fresh LoRA adapter on a fresh copy of the denoiser."""
    from vpotool.training.common import setup

    b.denoiser = copy.deepcopy(pristine).to(b.device)
    try:
        cfg = method_config(method, checkpointing, args, tmp / "train")
        trainer = setup(cfg, b)
        step = method_step(method, trainer, cfg, args, tmp)
        for i in range(args.warmup):
            step(i)
        times = []
        for i in range(args.warmup, args.warmup + args.repeats):
            t0 = clock(b.device)
            step(i)
            times.append(clock(b.device) - t0)
        return statistics.median(times), peak_gib(b.device)
    finally:
        b.denoiser = pristine
        # The VAE's weights are not frozen, so train-refl leaves gradients on them: clear them, so that no case
        # carries another's memory.
        for module in (b.codec.vae, b.text_encoder):
            module.zero_grad(set_to_none=True)


def bench_loop(folder: Path, args, tmp: Path) -> dict[str, float | str]:
    """Seconds per iteration of the loop and of its parts (benchmarks/bench_loop_overhead.py's ``time_loop`` and
    ``time_parts``, one timed iteration each), with this run's model, size and precision: 2 prompts x 2
    candidates sampled in one batch, 2 DPO steps with gradient checkpointing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_loop_overhead as overhead

    from vpotool.training.config import LoopConfig

    prompts = tmp / "loop-prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def loop_config(out: Path, iterations: int, **kw) -> LoopConfig:
        return LoopConfig(
            out=str(out), iterations=iterations, model="wan", model_path=str(folder), prompts=str(prompts),
            reward=REWARD, prompts_per_iter=2, candidates=2, steps_per_iter=2, sample_batch_size=4, batch_size=1,
            lora_rank=args.lora_rank, frames=args.frames, height=args.height, width=args.width,
            steps=args.rollout_steps, guidance=args.guidance, eval_prompts="none", device=args.device,
            dtype=args.dtype, mixed_precision=args.mixed_precision, gradient_checkpointing=True, **kw,
        )  # fmt: skip

    dev, real = torch.device(args.device), overhead.loop_config
    overhead.loop_config = loop_config  # its functions build their configs through this one
    try:
        log("loop: parts")
        parts = isolated(lambda: overhead.time_parts(1), dev)
        log("loop: run_loop, 1 and 2 iterations")
        (tmp / "loop").mkdir()
        loop = isolated(lambda: overhead.time_loop(tmp / "loop", 1), dev)
    finally:
        overhead.loop_config = real
    return {"parts": parts, "loop": loop}


def print_sampling(results: dict[str, list], args) -> None:
    def median(name: str, i: int):
        runs = results[name]
        return OOM if OOM in runs else statistics.median(r[i] for r in runs)

    print(f"\n### Sampling: 1 video, {args.sample_steps} steps, guidance {args.guidance}, median of {args.repeats}\n")
    print("| sampler | s / denoising step | s / video | of which VAE decode | peak GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, label in [("vpotool", "vpotool (`vpotool.sampling.sample` + decode)"), ("WanPipeline", "`WanPipeline`")]:
        cells = [fmt(median(name, i), ".3f") for i in range(3)] + [fmt(median(name, 3), ".1f")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if all(median(n, 0) != OOM for n in results):
        step, video = (median("vpotool", i) / median("WanPipeline", i) for i in (0, 1))
        print(f"\nvpotool / WanPipeline: {step:.3f}x per step, {video:.3f}x per video")


def print_training(results: dict, args) -> None:
    print(f"\n### Training: one optimizer step, LoRA rank {args.lora_rank}, median of {args.repeats} after "
          f"{args.warmup} warm-up\n")  # fmt: skip
    print("| method | s / step | peak GiB | planned GiB | s / step, checkpointing | peak GiB, checkpointing | "
          "planned GiB, checkpointing |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, label in METHODS.items():
        cells = []
        for checkpointing in (False, True):
            r, plan = results.get((m, checkpointing)), results.get(("plan", m, checkpointing))
            cells += [OOM, OOM] if r == OOM else [fmt(r[0], ".3f"), fmt(r[1], ".1f")] if r else ["-", "-"]
            cells.append(fmt(plan, ".1f") if isinstance(plan, float) else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        f"\nBatch: {args.batch} pair(s) for lora and dpo (2 latents each), {args.batch} prompt(s) for refl and "
        f"scst. Rollouts: {args.rollout_steps} steps, guidance {args.guidance}; refl keeps gradients through the "
        f"last step; scst adds the greedy rollout and updates on every step. Reward: {REWARD} (weight-free). One "
        "decoded frame: only the first latent frame goes through the VAE. Planned: `vpotool plan` of the same "
        "step on the same folder's configs (bench_gpu's stand-in text encoder included), before any weights load."
    )


def print_mfu(results: dict, spec: dict, shape: tuple[int, ...], args, device_name: str) -> None:
    flops = dpo_step_flops(spec["transformer"], shape, spec["text_len"], args.batch)
    linear, attention = forward_flops(spec["transformer"], shape, spec["text_len"])
    peak = args.peak_tflops or peak_tflops(device_name)
    where = f"{peak:g} TFLOP/s dense bf16 ({device_name})" if peak else f"not known for {device_name}; --peak-tflops"
    print(f"\n### Model FLOPs utilisation of the DPO step (peak: {where})\n")
    print("| DPO step | model TFLOP / step | s / step | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    for checkpointing in (False, True):
        r = results.get(("dpo", checkpointing))
        label = "with gradient checkpointing" if checkpointing else "without gradient checkpointing"
        if r is None or r == OOM:
            print(f"| {label} | {flops / 1e12:.4g} | {fmt(r) if r else '-'} | | |")
            continue
        rate = flops / r[0] / 1e12
        mfu = f"{100 * rate / peak:.1f}%" if peak else "n/a"
        print(f"| {label} | {flops / 1e12:.4g} | {r[0]:.3f} | {rate:.4g} | {mfu} |")
    share = attention / (linear + attention)
    print(
        f"\nOne forward on one latent: {(linear + attention) / 1e12:.4g} TFLOP ({100 * share:.0f}% attention). A DPO "
        "step counts, per latent, the policy's forward and backward and the reference's forward (3x the linear and "
        "4x the attention FLOPs of a forward), not checkpointing's recomputation."
    )


def print_loop(results: dict) -> None:
    print("\n### `loop`: one online DPO iteration (2 prompts x 2 candidates, 2 DPO steps) against its parts\n")
    print("| way | seconds per iteration | vs parts |")
    print("|---|---:|---:|")
    parts = results["parts"]
    for k, v in results.items():
        ratio = f"{v / parts:.3f}x" if OOM not in (v, parts) else ""
        print(f"| {k} | {fmt(v)} | {ratio} |")
    if OOM not in results.values():
        print(f"\nloop overhead over its parts: {100 * (results['loop'] / parts - 1):+.1f}%")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script in seconds")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--sample-steps", type=int, help="denoising steps of the timed sampling runs")
    ap.add_argument("--rollout-steps", type=int, help="denoising steps of the refl, scst and loop rollouts")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, help="timed runs (sampling) or optimizer steps (training) per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per training case")
    ap.add_argument("--batch", type=int, default=1, help="pairs (dpo, lora) or prompts (refl, scst) per step")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--dtype", help="frozen weights: bfloat16 (default) or float32 (--smoke's default)")
    ap.add_argument("--mixed-precision", help="bf16 (default) or no (--smoke's default)")
    ap.add_argument("--device", help="cuda (default; cpu with --smoke)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU the table lacks")
    args = ap.parse_args(argv)
    for k, v in RUNS["smoke" if args.smoke else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU on this machine; --smoke runs the script at a tiny size on the CPU")
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        ap.error(f"--only: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import diffusers

    from vpotool.models import load_backend, parse_dtype
    from vpotool.models.loading import quiet_loading

    quiet_loading()
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: more threads only wait on each other, badly on a shared CPU
    dev, spec = torch.device(args.device), TINY if args.smoke else WAN_1_3B
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tmp = Path(tempfile.mkdtemp(prefix="vpotool-bench-gpu-"))
    try:
        log("building the model")
        folder = tmp / "model"
        counts = build_checkpoint(folder, spec, dev, parse_dtype(args.dtype))
        fresh(dev)
        # The Wan VAE compresses 4x in time (after the first frame) and 8x in space; patches are 1 x 2 x 2.
        shape = (spec["vae"]["z_dim"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
        tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
        model = "tiny configs of the Wan classes (--smoke)" if args.smoke else "Wan 2.1 T2V 1.3B architecture"
        versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
        print(f"## GPU benchmark: {name}, {date.today()}, {versions}\n")
        print(
            f"- model: {model}, random weights; parameters: transformer {counts['transformer']:,}, VAE "
            f"{counts['vae']:,}, text encoder stand-in {counts['text_encoder']:,}; weights {args.dtype}, LoRA "
            f"float32, mixed precision {args.mixed_precision}"
        )
        print(
            f"- video: {args.frames} frames x {args.height}x{args.width}: latent {' x '.join(map(str, shape))}, "
            f"{tokens:,} tokens; prompt embeddings {spec['text_len']} x {spec['transformer']['text_dim']}"
        )
        if {"sampling", "training", "mfu"} & set(args.parts):
            b = load_backend("wan", str(folder), args.device, args.dtype)
            if "sampling" in args.parts:
                print_sampling(bench_sampling(b, args), args)
            if {"training", "mfu"} & set(args.parts):
                pristine = b.denoiser.to("cpu")  # each case trains a fresh copy of it
                methods = list(METHODS) if "training" in args.parts else ["dpo"]
                results = {}
                for m in methods:
                    for checkpointing in (False, True):
                        log(f"training: {m}{', checkpointing' if checkpointing else ''}")
                        results[m, checkpointing] = isolated(
                            lambda m=m, c=checkpointing: train_case(b, pristine, m, c, args, tmp), dev
                        )
                        if "training" in args.parts:
                            results["plan", m, checkpointing] = planned_gib(m, checkpointing, args, folder)
                if "training" in args.parts:
                    print_training(results, args)
                if "mfu" in args.parts:
                    print_mfu(results, spec, shape, args, name)
                del pristine
            del b
            fresh(dev)
        if "loop" in args.parts:
            print_loop(bench_loop(folder, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
