"""``vpotool plan STAGE [the stage's flags]``: the peak accelerator memory of a stage's step, before any GPU time.

The model is built from its configs on the meta device (no weights read; a 14B model in seconds) and one step of
the stage runs through the stage's own functions (the trainers' ``pair_loss``, ``refl_backward``, ``collect`` and
``policy_step``, the optimizer, ``sample``'s ``generate``, the rewards) under :func:`vpotool.memtrace.traced`,
which counts every tensor as a GPU's caching allocator would and keeps the peak. So the plan follows the code: a
change in a trainer changes the plan, with no formula to update. Each memory option not yet on is planned again
with it on, and its saving reported.

What the trace cannot see: the CUDA context and the allocator's fragmentation (``HEADROOM`` is left for them when
judging a fit), kernels' private workspaces (cuDNN, cuBLAS), and autocast (``--mixed-precision`` is traced at the
weights' dtype; plan bf16 weights with ``--dtype bfloat16``), nor several processes (FSDP's shards). A value read
back from the device (AdamW's step count, a mask's "any padding?") reads as :func:`vpotool.memtrace.read_back` says.

With ``--context-parallel N`` the step is one process's of a context group: the plan runs in one process with a
process group of N ranks that is its alone (torch's fake backend), under diffusers' engine as a launch runs it, so
the peak is a process's share of the video and the collectives are counted as the bytes it sends
(:func:`vpotool.memtrace.exchanged_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field

import torch

from vpotool.errors import VpoError
from vpotool.gpus import GIB, HEADROOM, UTILISATION, Gpu, fits, step_seconds

ADAPTERS = "adapters & optimizer"
CATEGORIES = ("weights", ADAPTERS, "activations", "text encoder", "VAE", "reward model")
TRACED = {  # what a plan traces of each stage: its peak, and the FLOPs (and time) of
    "sample": "one sampler call",
    "score": "one reward call",
    "train-dpo": "one optimizer step",
    "train-refl": "one optimizer step",
    "train-scst": "the rollouts and one trained step per chunk",
    "loop": "a sampler call, its scoring and a training step",
}


@dataclass
class Plan:
    """A stage's planned peak: ``parts`` by category at the peak, FLOPs of the step, and per memory option not yet
    on, ``(flag, peak with it)`` (None where the model refuses the option)."""

    stage: str
    model: str
    setting: str
    peak: int
    parts: dict[str, int]
    flops: int
    step: int = 0  # what the step itself adds at its peak, over what is live when it starts
    bf16: bool = False  # the step runs in bf16 (weights or autocast): the GPU's bf16 rate applies
    options: list[tuple[str, int | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    context_parallel: int = 1  # processes sharing each video; peak, FLOPs and traffic are one process's
    exchanged: int = 0  # bytes one process sends to the others of its context group in the traced step

    def as_dict(self, gpu: Gpu | None) -> dict:
        out = dataclasses.asdict(self)
        out["options"] = [
            {"flag": f, "peak": p, "saves": None if p is None else self.peak - p} for f, p in self.options
        ]
        if gpu is not None:
            seconds = step_seconds(self.flops, gpu, self.bf16)
            out["gpu"] = dict(name=gpu.name, memory=gpu.memory, fits=fits(self.peak, gpu), step_seconds=seconds)
        return out


# --- the traced steps


class PlanAccelerator:
    """The one-process accelerator a planned step runs under: what the trainers call on ``trainer.accelerator``."""

    num_processes, process_index, is_main_process = 1, 0, True

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, model):
        return model

    def no_sync(self, model):
        return contextlib.nullcontext()


def modules_of(obj, seen=None) -> list[torch.nn.Module]:
    """The ``nn.Module``s an object holds (a reward, a codec), looking one level into plain attributes and dicts."""
    seen = set() if seen is None else seen
    out = []
    values = obj.values() if isinstance(obj, dict) else vars(obj).values() if hasattr(obj, "__dict__") else ()
    for v in values:
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            out.append(v)
        elif isinstance(v, dict) or (hasattr(v, "__dict__") and type(v).__module__.startswith("vpotool")):
            out.extend(modules_of(v, seen))
    return out


def tensors_of(modules) -> list[torch.Tensor]:
    return [t for m in modules for t in [*m.parameters(), *m.buffers()]]


def charge_forward(trace, modules, category: str) -> None:
    """Charge what ``modules``' forwards allocate (their activations) to ``category``."""
    stack = []

    def enter(*_):
        stack.append(trace.category)
        trace.category = category

    def leave(*_):
        trace.category = stack.pop() if stack else "activations"

    for m in modules:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)


def adopt_backend(trace, backend) -> None:
    """Count the backend's weights: the denoiser's, the text encoder's and the VAE's (each charged with its
    forward's activations too)."""
    text = [m for m in [getattr(backend, "text_encoder", None)] if isinstance(m, torch.nn.Module)]
    codec = modules_of(getattr(backend, "codec", None) or {})
    trace.adopt(tensors_of(text), "text encoder")
    trace.adopt(tensors_of(codec), "VAE")
    trace.adopt(tensors_of([backend.denoiser]), "weights")
    charge_forward(trace, text, "text encoder")
    charge_forward(trace, codec, "VAE")


def load_planned_reward(trace, spec: str, cfg, several: bool = False):
    """The reward(s) ``spec`` built without weights on the meta device, weights charged to ``reward model``."""
    from vpotool.models.loading import without_weights
    from vpotool.rewards import load_reward, load_rewards

    with without_weights(), trace.charge("reward model"):  # built inside the trace: charged as it is made
        if several:
            rewards = load_rewards(spec, cfg.reward_path, "meta", options=cfg.reward_options)
        else:
            rewards = {spec: load_reward(spec, cfg.reward_path, "meta", options=cfg.reward_options)}
    modules = [m for r in rewards.values() for m in modules_of(r)]
    trace.adopt(tensors_of(modules), "reward model")
    charge_forward(trace, modules, "reward model")
    return rewards if several else rewards[spec]


def planned_prompts(cfg, n: int) -> list[str]:
    """``n`` prompts of the run (its ``--prompts``), or of the tiny world when it names none (their length is the
    text encoder's padded length either way)."""
    from vpotool.prompts import load_prompts

    spec = getattr(cfg, "prompts", "") or "world:align"
    texts = [p for _, p in load_prompts(spec)]
    return [texts[i % len(texts)] for i in range(n)]


def planned_trainer(trace, backend, cfg, extra=()):
    """The trainer's adapter (``training.common.adapt``), AdamW over it, and a one-process accelerator; gradients of
    the adapter are charged to it as they land."""
    from vpotool.training.common import Trainer, adapt

    with trace.charge(ADAPTERS):
        params = adapt(backend, cfg, extra)
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: trace.move([p.grad], ADAPTERS))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Trainer(PlanAccelerator(), backend, params, optimizer, scheduler, metrics=None)


def finish(trace, trainer, cfg) -> None:
    from vpotool.training.common import apply_gradients

    with trace.charge(ADAPTERS):
        apply_gradients(trainer, cfg)


def encode_run_prompts(trace, backend, cfg, prompts):
    """Encode the step's prompts as the trainer does; ``--offload-text-encoder`` then takes the encoder (and the
    cached embeddings) off the device."""
    cond = backend.condition(prompts)
    if getattr(cfg, "offload_text_encoder", False):  # as TextVideoBackend.offload_text_encoder: the negative too
        backend.encode_negative(1)
        trace.release(tensors_of([backend.text_encoder]))
    return cond


def video_settings(cfg, backend, extra: dict) -> dict:
    """The generation settings the stage would resolve, with ``extra``'s size for stages whose config has none (a
    DPO step's size is its pairs' latents'), then told to the backend as the stage tells it."""
    from types import SimpleNamespace

    from vpotool.sampling import resolved_settings, use_settings

    unset = dict.fromkeys(("frames", "height", "width", "size", "steps", "guidance"))
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    view = SimpleNamespace(**{**unset, **given, **{k: v for k, v in extra.items() if v}})
    settings = resolved_settings(view, backend)
    use_settings(backend, settings)
    return settings


def trace_dpo(trace, backend, cfg, settings):
    from vpotool.training.dpo import pair_loss, reference_adapters

    prompts = planned_prompts(cfg, cfg.batch_size)
    cond = encode_run_prompts(trace, backend, cfg, prompts)
    trainer = planned_trainer(trace, backend, cfg, reference_adapters(cfg))
    ref_mode = "ref" if reference_adapters(cfg) else "base"
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    x0 = [torch.zeros((cfg.batch_size, *shape), device=backend.device) for _ in range(2)]
    seeds = list(range(cfg.batch_size))
    trace.mark()
    out = pair_loss(backend, trainer.denoiser, *x0, cond, seeds, cfg, ref_mode)
    trainer.accelerator.backward(out.loss / cfg.grad_accum)
    finish(trace, trainer, cfg)


def trace_refl(trace, backend, cfg, settings):
    from vpotool.rewards import check_reward_frames
    from vpotool.training.refl import enable_vae_checkpointing, refl_backward
    from vpotool.training.reward import frame_index

    if cfg.vae_checkpointing:
        enable_vae_checkpointing(backend)
    seen = len(frame_index(settings["frames"], cfg.reward_frames))
    check_reward_frames(cfg.reward, seen, "each rollout, as --reward-frames keeps it,")
    prompts = planned_prompts(cfg, cfg.batch_size)
    encode_run_prompts(trace, backend, cfg, prompts)
    reward = load_planned_reward(trace, cfg.reward, cfg)
    trainer = planned_trainer(trace, backend, cfg)
    gen = torch.Generator().manual_seed(0)
    trace.mark()
    refl_backward(trainer, cfg, reward, prompts, list(range(len(prompts))), settings, gen)
    finish(trace, trainer, cfg)


def trace_scst(trace, backend, cfg, settings):
    from vpotool.training.forward import forward_step
    from vpotool.training.scst import as_videos, check_rollout_training, collect, policy_step, trained_steps

    check_rollout_training(backend, cfg, settings)
    prompts = planned_prompts(cfg, cfg.batch_size)
    encode_run_prompts(trace, backend, cfg, prompts)
    reward = load_planned_reward(trace, cfg.reward, cfg)
    trainer = planned_trainer(trace, backend, cfg)
    trace.mark()
    ro = collect(backend, reward, prompts, list(range(len(prompts))), settings, cfg)
    if cfg.estimator != "logp":  # every draw, one at a time (on an autoregressive model each may train a chunk)
        forward_step(trainer, as_videos(ro, 0), cfg, 1.0)
        finish(trace, trainer, cfg)
        return
    sched = backend.schedule(settings["steps"], tuple(ro.states[0].shape[1:]))
    # every trained step holds one step's graph at a time (the gradients accumulate), the same within a chunk of an
    # autoregressive rollout (a later chunk sees more context): the first trained step of each chunk traces the peak
    per_chunk = settings["steps"]
    trained = trained_steps(ro.logps.shape[1], cfg, 0, per_chunk)
    steps = list({i // per_chunk: i for i in reversed(trained)}.values())
    policy_step(trainer, ro, sched, steps, cfg, settings, 1.0, clipped=False)
    finish(trace, trainer, cfg)


def trace_sample(trace, backend, cfg, settings, videos: int | None = None):
    from vpotool.stages.sample import generate

    k = getattr(cfg, "candidates", 1)
    videos = videos or max(cfg.batch_size // k, 1) * k
    prompts = planned_prompts(cfg, videos)
    trace.mark()
    with torch.no_grad():
        return generate(backend, prompts, list(range(videos)), settings)[1]


def trace_score(trace, cfg, settings, frames=None):
    from vpotool.rewards.base import call_reward

    rewards = load_planned_reward(trace, cfg.reward, cfg, several=True)
    b = cfg.batch_size
    if frames is None:
        frames = torch.zeros((b, settings["frames"], 3, settings["height"], settings["width"]), device="meta")
    prompts = planned_prompts(cfg, frames.shape[0])
    trace.mark()
    with torch.no_grad():
        for reward in rewards.values():
            call_reward(reward, frames, prompts, settings["fps"])


def trace_loop(trace, backend, cfg, settings):
    """An iteration's phases with every model in memory: sampling a call's videos, scoring them, one step of the
    algorithm (each phase's peak is its own; the plan's is the largest)."""
    logp = cfg.algo == "scst" and cfg.estimator == "logp"
    sample_settings = {**settings, "noise_level": cfg.noise_level or (0.7 if logp else 0.0)}
    trainer_cfg = cfg
    frames = trace_sample(trace, backend, cfg, sample_settings, videos=cfg.sample_batch_size)
    from vpotool.rewards.base import call_reward

    reward = load_planned_reward(trace, cfg.reward, cfg)
    with torch.no_grad():
        call_reward(reward, frames.float(), planned_prompts(cfg, frames.shape[0]), settings["fps"])
    del frames
    step = {"dpo": trace_dpo, "refl": trace_refl, "scst": trace_scst}[cfg.algo]
    if cfg.algo == "scst":
        trainer_cfg = dataclasses.replace(cfg)
        trainer_cfg.group_size = cfg.candidates
        trainer_cfg.noise_level = sample_settings["noise_level"]
        trainer_cfg.advantage, trainer_cfg.context = "video", "own"
    step(trace, backend, trainer_cfg, sample_settings)


TRACERS = {"train-dpo": trace_dpo, "train-refl": trace_refl, "train-scst": trace_scst, "loop": trace_loop}


def trace_stage(stage: str, cfg, extra: dict):
    """``(trace, FLOPs, the setting in words)`` of one step of ``stage``: the :class:`~vpotool.memtrace.MemoryTrace`
    holds the peak and its parts. Under ``cfg.context_parallel`` N > 1, one process's of a context group of N."""
    n = getattr(cfg, "context_parallel", 1)
    if n == 1:
        return trace_process(stage, cfg, extra)
    from vpotool.models.context_parallel import check_family, planning_group

    check_family(cfg.model, n)
    with planning_group(n) as layout:
        return trace_process(stage, cfg, extra, layout)


def trace_process(stage: str, cfg, extra: dict, layout=None):
    """:func:`trace_stage` for one process, of the context group of ``layout`` when given."""
    from vpotool.memtrace import traced
    from vpotool.models import load_backend
    from vpotool.models.loading import without_weights

    if stage == "score":
        settings = {"frames": extra.get("frames") or 33, "height": extra.get("height") or 480,
                    "width": extra.get("width") or 832, "fps": 16}  # fmt: skip
        with traced() as trace:
            trace_score(trace, cfg, settings)
        words = f"{cfg.batch_size} videos of {settings['frames']} frames at {settings['height']}x{settings['width']}"
        return trace, trace.flops, words
    dtype = getattr(cfg, "dtype", "float32")
    with without_weights():
        backend = load_backend(cfg.model, cfg.model_path, "meta", dtype, cfg.model_options)
    settings = video_settings(cfg, backend, extra)
    if layout is not None:
        # The launch shares the denoiser after the trainer's adapters are added, and the loop samples with it; here
        # before them, so that the loop's sampling traces shared too (the default adapters replace no hooked module).
        from vpotool.models import context_parallel

        context_parallel.enable(backend, layout)
        shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
        context_parallel.check_tokens(backend, shape, layout.degree)
    with traced() as trace:
        adopt_backend(trace, backend)
        if stage == "sample":
            trace_sample(trace, backend, cfg, settings)
        else:
            TRACERS[stage](trace, backend, cfg, settings)
    batch = cfg.sample_batch_size if stage == "loop" else getattr(cfg, "batch_size", 1)
    words = (f"batch {batch}, {settings['frames']} frames at {settings['height']}x{settings['width']}, "
             f"{settings['steps']} steps, {dtype} weights")  # fmt: skip
    return trace, trace.flops, words


def memory_options(stage: str, cfg) -> list[tuple[str, dict]]:
    """The memory options of ``stage`` not yet on: ``(flag, config changes)``."""
    out = []
    trains = stage.startswith("train") or stage == "loop"
    if trains and not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if trains and not cfg.offload_text_encoder:
        out.append(("--offload-text-encoder", {"offload_text_encoder": True}))
    if stage != "score" and getattr(cfg, "dtype", "float32") == "float32":
        out.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    if stage in ("train-refl",) or (stage == "loop" and cfg.algo == "refl"):
        if not cfg.vae_checkpointing:
            out.append(("--vae-checkpointing", {"vae_checkpointing": True}))
        if cfg.reward_frames != "1":
            out.append(("--reward-frames 1", {"reward_frames": "1"}))
    if stage in ("sample", "train-refl", "loop") and "vae_tiling" not in (cfg.model_options or ""):
        joined = ",".join(x for x in [cfg.model_options, "vae_tiling=true"] if x)
        out.append(("--model-options vae_tiling=true", {"model_options": joined}))
    size = "sample_batch_size" if stage == "loop" else "batch_size"
    if getattr(cfg, size, 1) > 1:
        out.append((f"--{size.replace('_', '-')} 1", {size: 1}))
    return out


def plan_stage(stage: str, cfg, extra: dict | None = None, alternatives: bool = True) -> Plan:
    """Plan one step of ``stage`` run with ``cfg`` (and, for stages whose config has no video size, ``extra``
    frames/height/width/size), and each memory option not yet on."""
    t0 = time.perf_counter()
    extra = extra or {}
    trace, flops, words = trace_stage(stage, cfg, extra)
    parts = {c: trace.at_peak.get(c, 0) for c in CATEGORIES}
    plan = Plan(stage, getattr(cfg, "model", "-"), words, trace.peak, parts, flops, trace.step_peak - trace.base)
    plan.context_parallel, plan.exchanged = getattr(cfg, "context_parallel", 1), trace.exchanged
    mixed = getattr(cfg, "mixed_precision", "no") != "no"
    plan.bf16 = getattr(cfg, "dtype", "float32") in ("bfloat16", "bf16") or mixed
    if mixed:
        plan.notes.append("--mixed-precision is planned without autocast (activations at the weights' dtype)")
    if alternatives:
        for flag, changes in memory_options(stage, cfg):
            try:
                alt = dataclasses.replace(cfg, **changes)
                plan.options.append((flag, trace_stage(stage, alt, extra)[0].peak))
            except VpoError:
                plan.options.append((flag, None))
    plan.seconds = time.perf_counter() - t0
    return plan


# --- output


def gib(n: int | None) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    if n is None:
        return "-"
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:,.1f} MiB"


def flop_text(n: int) -> str:
    return f"{n / 1e12:,.1f} TFLOP" if n >= 1e12 else f"{n / 1e9:,.2f} GFLOP"


def render(plan: Plan, gpu: Gpu | None) -> None:
    """The plan as one table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vpotool plan {plan.stage}: --model {plan.model}, {plan.setting}", title_justify="left")
    table.add_column("peak memory per process")
    table.add_column("", justify="right")
    for c in CATEGORIES:
        if plan.parts.get(c):
            table.add_row(c, gib(plan.parts[c]))
    table.add_row("[bold]total at the peak[/bold]", f"[bold]{gib(plan.peak)}[/bold]")
    if gpu is not None:
        verdict = fits(plan.peak, gpu)
        colour = {"fits": "green", "tight": "yellow"}.get(verdict, "red")
        table.add_row(f"on {gpu.name} ({gib(gpu.memory)}, {gib(HEADROOM)} kept for CUDA)", f"[{colour}]{verdict}[/]")
    if plan.context_parallel > 1:
        table.add_row("context parallel", f"{plan.context_parallel} processes share each video")
        table.add_row(f"sent to the group in {TRACED[plan.stage]}", gib(plan.exchanged))
    table.add_row(f"FLOPs of {TRACED[plan.stage]}", flop_text(plan.flops))
    if gpu is not None:
        seconds = step_seconds(plan.flops, gpu, plan.bf16)
        if seconds is not None:
            table.add_row(f"its time at {UTILISATION:.0%} of {gpu.name}'s peak", f"{seconds:,.2f} s")
    for flag, peak in plan.options:
        saved = "refused by this model" if peak is None else f"saves {gib(plan.peak - peak)} -> {gib(peak)}"
        table.add_row(f"with {flag}", saved)
    console = Console()
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(f"planned in {plan.seconds:.1f} s")


def run_plan(cfg, stage: str, gpu: str | None = None, json_out: bool = False, **extra) -> str:
    """The ``vpotool plan`` commands: plan, then print the table (or JSON)."""
    from vpotool.gpus import parse_gpu

    device = parse_gpu(gpu)
    plan = plan_stage(stage, cfg, extra)
    if json_out:
        print(json.dumps(plan.as_dict(device), indent=1))
    else:
        render(plan, device)
    return ""
