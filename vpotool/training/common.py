"""What every trainer shares: accelerate setup, LoRA on the backend, AdamW with warm-up, checkpoints
(``OUT/checkpoints/step-N``: the adapter plus optimizer and scheduler state as safetensors) and metrics."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from vpotool import __version__
from vpotool.errors import VpoError, disk_space
from vpotool.latents import write_safetensors
from vpotool.manifest import RowWriter, remove_stale_temps
from vpotool.models import context_parallel
from vpotool.models.context_parallel import Layout
from vpotool.training import fsdp
from vpotool.training.config import RolloutOptions, TrainConfig
from vpotool.training.lora import (
    adapter_parameters,
    adapter_state,
    adapter_weights,
    add_lora,
    load_adapter_state,
    save_adapter,
)

STATE_FILE = "state/trainer_state.safetensors"  # in a subfolder, so diffusers sees one weights file per step


@dataclass
class Trainer:
    """The pieces a training loop needs, built by :func:`setup`."""

    accelerator: object
    backend: object
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    metrics: RowWriter
    start_step: int = 0
    layout: Layout = field(default_factory=Layout)  # the context groups of the launch (--context-parallel)

    @property
    def denoiser(self):
        """The unwrapped denoiser (adapter switching works on it, not on a DDP wrapper)."""
        return self.accelerator.unwrap_model(self.backend.denoiser)

    @property
    def data_parallel(self) -> tuple[int, int]:
        """``(ways, index)``: how many micro-batches the launch takes side by side and which is this process's. Each
        context group takes one (its processes share it), so without ``--context-parallel`` each process."""
        acc, n = self.accelerator, self.layout.degree
        return acc.num_processes // n, acc.process_index // n


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, slot: int, seed: int) -> list[int]:
    """Indices of micro-batch ``slot`` in a seeded, per-epoch shuffled stream over ``n`` examples (resumable)."""
    out = []
    for p in range(slot * batch_size, (slot + 1) * batch_size):
        epoch, i = divmod(p, n)
        out.append(int(_permutation(n, seed, epoch)[i]))
    return out


def setup(cfg: TrainConfig, backend=None, extra_adapters: tuple[str, ...] = (), prompts=()) -> Trainer:
    """Accelerator, backend with a trainable LoRA adapter (plus frozen ``extra_adapters``), AdamW, warm-up
    schedule and the metrics writer; resumes from the latest checkpoint when ``cfg.resume``. With
    ``cfg.offload_text_encoder`` the run's ``prompts`` are encoded now and the text encoder leaves the device.

    Under FSDP (:func:`vpotool.training.fsdp.requested`) the denoiser is sharded over the processes: by accelerate's
    FSDP plugin on GPUs, by :func:`vpotool.training.fsdp.shard_if_requested` where accelerate falls back to DDP
    (CPU). With ``cfg.context_parallel`` the processes of each context group share the denoiser's tokens
    (:mod:`vpotool.models.context_parallel`); a rollout trainer's video size is checked against it here."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from vpotool.models import load_backend, resolve_device

    layout = context_parallel.launch_layout(cfg.context_parallel, cfg.model)  # before anything is made
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=cfg.mixed_precision, log_with=cfg.report_to, project_dir=cfg.out
    )
    set_seed(cfg.seed)
    if backend is None:
        device = str(accelerator.device) if cfg.device == "auto" else resolve_device(cfg.device)
        backend = load_backend(cfg.model, cfg.model_path, device, cfg.dtype, cfg.model_options)
    if getattr(getattr(backend, "chunking", None), "ar_step", 0):  # vpotool.diffusion_forcing: deterministic only
        raise VpoError(f"--model-options ar_step={backend.chunking.ar_step} (SkyReels-V2's asynchronous mode) "
                       "samples only: the trainers step a chunk's frames together; train with ar_step=0")  # fmt: skip
    if cfg.offload_text_encoder:
        backend.offload_text_encoder(list(prompts))
    params = adapt(backend, cfg, extra_adapters)
    if layout.degree > 1:  # after the adapters (the plan hooks the modules there), before any wrapper
        context_parallel.enable(backend, layout)
        if isinstance(cfg, RolloutOptions):  # the size of the videos it samples; train-dpo's is its pairs'
            from vpotool.sampling import resolved_settings

            settings = resolved_settings(cfg, backend)
            shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
            context_parallel.check_tokens(backend, shape, layout.degree)
    own_fsdp = fsdp.shard_if_requested(accelerator, backend.denoiser, cfg.model)
    if own_fsdp:
        params = adapter_parameters(backend.denoiser)  # sharding replaced them
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    if getattr(backend.denoiser, "experts", None) and accelerator.ddp_handler is None:
        # A micro-batch whose timesteps all fall on one side of the boundary leaves the other expert's adapter
        # without gradients, which DDP must be told to expect.
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    if own_fsdp:  # already sharded: accelerate would wrap it in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        backend.denoiser, optimizer = accelerator.prepare(backend.denoiser, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # accelerate's FSDP swaps in shards
    if cfg.report_to:
        accelerator.init_trackers("vpotool", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    metrics = RowWriter(Path(cfg.out) / "metrics.parquet", "metrics", cfg.to_dict())
    trainer = Trainer(accelerator, backend, params, optimizer, scheduler, metrics, layout=layout)
    for folder in [*Path(cfg.out).glob("checkpoints/step-*"), *Path(cfg.out).glob("checkpoints/step-*/state")]:
        remove_stale_temps(folder)  # a killed run's half-written checkpoint files
    latest = latest_checkpoint(cfg.out)
    if latest is not None and not cfg.resume:
        raise VpoError(
            f"{cfg.out} already holds checkpoints up to {latest.name}; rerun without --no-resume to continue that "
            "run, or pass a new --out to start over"
        )
    if latest is not None:
        check_resumable(cfg, latest)
        trainer.start_step = load_checkpoint(trainer, latest, extra_adapters)
        accelerator.print(f"resuming {cfg.out} from {latest.name}")
    # Rows past the step training restarts from (a run killed before its next checkpoint, or --no-resume) are
    # dropped, so each step is logged once.
    metrics.rows = [r for r in metrics.rows if r["step"] <= trainer.start_step]
    metrics.done = {metrics.key(r) for r in metrics.rows}
    return trainer


def adapt(backend, cfg: TrainConfig, extra_adapters: tuple[str, ...] = ()) -> list:
    """The trainable LoRA adapter ``default`` (and frozen ``extra_adapters``) on the backend's denoiser, started
    from ``cfg.init_adapter`` when given, with gradient checkpointing when asked, in train mode. Returns the
    trainable parameters."""
    targets = cfg.lora_targets.split(",") if cfg.lora_targets else backend.lora_target_modules
    check_lora_memory(backend, cfg.lora_rank, targets, len(extra_adapters))
    alpha = cfg.lora_alpha or cfg.lora_rank
    params = add_lora(backend.denoiser, cfg.lora_rank, alpha, targets)
    for name in extra_adapters:
        add_lora(backend.denoiser, cfg.lora_rank, alpha, targets, name=name, trainable=False)
    backend.denoiser.set_adapter("default")
    if cfg.init_adapter:  # before any resume: a resumed run's checkpoint replaces it
        state = adapter_weights(backend.denoiser, cfg.init_adapter, backend.info.name, "--init-adapter")
        load_adapter_state(backend.denoiser, state)
    if cfg.gradient_checkpointing:
        if not getattr(backend.denoiser, "_supports_gradient_checkpointing", False):
            kind = type(backend.model).__name__
            raise VpoError(f"--gradient-checkpointing: {kind} ({cfg.model}) does not support it; drop the flag")
        backend.denoiser.enable_gradient_checkpointing()
    backend.denoiser.train()
    return params


def check_lora_memory(backend, rank: int, targets: list[str], frozen: int = 0) -> None:
    """Refuse up front (see :mod:`vpotool.memory`) a LoRA whose float32 weights, gradients and AdamW moments (16
    bytes a parameter, plus 4 for each of ``frozen`` frozen copies) could not fit the device, e.g. ``--lora-rank
    1000000``: counted from the target modules' shapes, before any is allocated."""
    from vpotool.memory import check_fits, lora_parameters

    n = lora_parameters(backend.denoiser, rank, targets)
    what = f"--lora-rank {rank} ({n:,} LoRA parameters on {', '.join(targets)}, with gradients and AdamW state)"
    check_fits(n * (16 + 4 * frozen), backend.device, what, "lower --lora-rank (4 to 128 is usual)")


# Options a resumed run may change: they extend it or change where and how it runs, not what it learns from; a
# trainer may also retune the optimizer's schedule (continuing at a lower lr is common practice). Every other option
# (model, LoRA shape, pairs or prompts, reward, beta, sampler settings, batch size, seed, ...) must be the
# checkpoint's.
RUN_OPTIONS = frozenset(
    {"out", "max_steps", "resume", "save_every", "device", "report_to", "gradient_checkpointing",
     "offload_text_encoder", "reward_device", "vae_checkpointing", "context_parallel"}
)  # fmt: skip
SCHEDULE_OPTIONS = frozenset({"lr", "warmup_steps", "weight_decay", "max_grad_norm"})
RESUME_HARMLESS = RUN_OPTIONS | SCHEDULE_OPTIONS


def check_resumable(cfg: TrainConfig, folder: Path) -> None:
    """Refuse, in one line, to resume ``folder`` (a checkpoint) under settings its adapter was not trained with."""
    try:
        with safe_open(str(folder / STATE_FILE), "pt") as f:
            meta = f.metadata() or {}
        saved = json.loads(meta.get("config", "{}"))
    except Exception as e:  # noqa: BLE001 (any damage means the same thing to the user)
        raise VpoError(
            f"checkpoint {folder} is damaged ({e}); delete that folder to resume from an earlier one"
        ) from e
    # Input files are compared by contents where the checkpoint recorded them: a byte-identical copy at another
    # path is the same run, a file rewritten in place is not.
    recorded = json.loads(meta.get("inputs", "{}"))
    digests = {k: v for k, v in input_digests(cfg).items() if k in recorded}
    # An unset option (None) takes the same default as before, e.g. train-dpo's beta from the same model.
    now = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_HARMLESS | set(digests) and v is not None}
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]
    differ += [f"the contents of --{k} ({getattr(cfg, k)})" for k, v in digests.items() if recorded[k] != v]
    if differ:
        raise VpoError(
            f"{cfg.out} holds a run trained with other settings ({'; '.join(differ)}); pass a new --out, or "
            f"delete {Path(cfg.out) / 'checkpoints'} to start over there"
        )


INPUT_FILES = ("pairs", "prompts", "samples", "scores")  # options naming a file a trainer learns from


def input_digests(cfg: TrainConfig) -> dict[str, str]:
    """A fingerprint of the contents of each input file ``cfg`` names (pairs, prompts, samples, scores), recorded in
    every checkpoint so that a resume compares contents, not paths."""
    import hashlib

    out = {}
    for name in INPUT_FILES:
        path = getattr(cfg, name, None)
        if path and Path(path).is_file():
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def latest_checkpoint(out: str | Path) -> Path | None:
    """The ``checkpoints/step-N`` folder with the largest N that has its trainer state, or None."""
    steps = []
    for p in (Path(out) / "checkpoints").glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def gathered_state(trainer: Trainer) -> dict | None:
    """Under FSDP each process holds a shard of every weight, the adapters' too: their full weights are gathered
    (a collective every process joins) for rank 0 to save. None otherwise: the unwrapped module holds it all."""
    if not fsdp.is_sharded(trainer.denoiser):
        return None
    return fsdp.full_adapters(trainer.denoiser)


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The AdamW ``state`` (of the optimizer's state dict) as full CPU tensors keyed ``optim.<param index>.<name>``
    (under FSDP each moment is gathered from its shards: every process must call this)."""
    return {f"optim.{i}.{k}": fsdp.full_tensor(torch.as_tensor(state[i][k])).contiguous() for i in sorted(state)
            for k in sorted(state[i])}  # fmt: skip


def save_checkpoint(trainer: Trainer, cfg: TrainConfig, step: int, extra_adapters: tuple[str, ...] = ()) -> Path:
    """``OUT/checkpoints/step-N``: the adapter (diffusers format) and ``state/trainer_state.safetensors`` with the
    optimizer moments, extra adapters (e.g. the DPO reference) and, in its metadata, step, schedule and config."""
    acc = trainer.accelerator
    folder = Path(cfg.out) / "checkpoints" / f"step-{step}"
    full = gathered_state(trainer)  # every process takes part in the gathers; rank 0 writes
    opt = trainer.optimizer.state_dict()
    tensors = optimizer_tensors(opt["state"])
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return folder
    try:
        with disk_space(folder):
            write_checkpoint(trainer, cfg, step, folder, tensors, opt, full, extra_adapters)
    except BaseException:
        # A step folder without its trainer state is no checkpoint; left behind (empty, or with the adapter
        # alone) it would read as one to eval and people, while resuming skips it.
        if not (folder / STATE_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    return folder


def write_checkpoint(trainer, cfg, step: int, folder: Path, tensors: dict, opt: dict, full, extra_adapters) -> None:
    """The main process's part of :func:`save_checkpoint`: the adapter, then the trainer state, into ``folder``."""
    b = trainer.backend
    meta = {"base_model": b.info.name, "base_model_path": b.info.path, "step": step, "config": cfg.to_dict()}
    save_adapter(trainer.denoiser, folder, meta, full_state=full)
    for name in extra_adapters:
        state = adapter_state(trainer.denoiser, name, full)
        tensors.update({f"adapter.{name}.{k}": v.cpu().contiguous() for k, v in state.items()})
    sched = {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"}
    state_meta = {
        "vpotool.schema": "trainer_state",
        "vpotool.version": __version__,
        "step": str(step),
        "param_groups": json.dumps(opt["param_groups"]),
        "scheduler": json.dumps(sched),
        "config": json.dumps(cfg.to_dict(), default=str),
        "inputs": json.dumps(input_digests(cfg)),
    }
    path = folder / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written last: a step folder counts as a checkpoint only once this exists. Its crash point (the adapter is
    # saved, the state not yet) is where the crash-safety tests kill.
    write_safetensors(path, tensors or {"empty": torch.zeros(0)}, state_meta, crash=True)


def load_checkpoint(trainer: Trainer, folder: Path, extra_adapters: tuple[str, ...] = ()) -> int:
    """Restore adapter, extra adapters, optimizer and scheduler from ``folder``; returns its step."""
    from safetensors.torch import load_file

    from vpotool.training.lora import ADAPTER_FILE, PREFIX

    try:
        weights = load_file(str(folder / ADAPTER_FILE))
        tensors = load_file(str(folder / STATE_FILE))
        with safe_open(str(folder / STATE_FILE), "pt") as f:
            meta = f.metadata()
    except Exception as e:  # noqa: BLE001 (any damage means the same thing to the user)
        raise VpoError(
            f"checkpoint {folder} is damaged ({e}); delete that folder to resume from an earlier one"
        ) from e
    load_adapter_state(trainer.denoiser, {k.removeprefix(f"{PREFIX}."): v for k, v in weights.items()})
    for name in extra_adapters:
        prefix = f"adapter.{name}."
        load_adapter_state(
            trainer.denoiser, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, name
        )
    state: dict = {}
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            # The moments are saved whole; under FSDP each process takes its shard of them (the step count stays).
            state.setdefault(int(i), {})[key] = fsdp.like(v, params[int(i)]) if v.dim() else v
    trainer.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    trainer.scheduler.load_state_dict({**json.loads(meta["scheduler"]), "lr_lambdas": [None]})
    trainer.denoiser.set_adapter("default")
    return int(meta["step"])


def log_metrics(trainer: Trainer, step: int, values: dict) -> None:
    """One row of ``metrics.parquet`` (flushed at once) and, when asked, the accelerate trackers. Under several
    processes the values are averaged over them first (every process must call this)."""
    acc = trainer.accelerator
    if acc.num_processes > 1:
        names = sorted(values)
        mean = acc.reduce(torch.tensor([float(values[k]) for k in names], device=acc.device), reduction="mean")
        values = dict(zip(names, mean.tolist(), strict=True))
    if not acc.is_main_process:
        return
    row = {"step": step, **{k: float(v) for k, v in values.items()}}
    trainer.metrics.add([row])
    trainer.metrics.flush()
    trainer.accelerator.log(values, step=step)


def grad_sync(trainer: Trainer, last: bool):
    """Context for one forward + backward of a step made of several: gradients are all-reduced across processes
    only on the ``last`` one; earlier ones accumulate locally under the wrapper's ``no_sync`` (DDP checks it in
    the forward, so the forward belongs inside too)."""
    if fsdp.is_sharded(trainer.denoiser):  # sharded by vpotool or by accelerate: FSDP2's own switch
        return fsdp.gradient_sync(trainer.denoiser, enabled=last)
    if last:
        return contextlib.nullcontext()
    return trainer.accelerator.no_sync(trainer.backend.denoiser)


def optimizer_step(trainer: Trainer, cfg: TrainConfig) -> float | None:
    """Clip gradients (when ``cfg.max_grad_norm``), step the optimizer and the schedule, clear gradients.
    Returns the gradient norm before clipping, or None."""
    norm = apply_gradients(trainer, cfg)
    return None if norm is None else float(fsdp.full_tensor(norm))


def apply_gradients(trainer: Trainer, cfg: TrainConfig) -> torch.Tensor | None:
    """:func:`optimizer_step` without reading the norm back: clip, step, schedule, clear. Returns the norm tensor.
    Under ``--context-parallel`` the averaged gradients are first scaled to the groups' mean
    (:func:`~vpotool.models.context_parallel.gradient_scale`)."""
    scale = context_parallel.gradient_scale(trainer.layout)
    if scale != 1:
        for p in trainer.params:
            if p.grad is not None:  # an expert no micro-batch reached has none
                p.grad.mul_(scale)
    norm = trainer.accelerator.clip_grad_norm_(trainer.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return norm


def finish_step(trainer: Trainer, cfg: TrainConfig, step: int, values: dict, grad_norm, on_step, extra=()) -> None:
    """After an optimizer step: log ``values`` with the learning rate and gradient norm, call ``on_step`` and
    write a checkpoint every ``cfg.save_every`` steps and at the last one."""
    values = {**values, "lr": trainer.scheduler.get_last_lr()[0]}
    if grad_norm is not None:
        values["grad_norm"] = grad_norm
    log_metrics(trainer, step, values)
    if on_step is not None:
        on_step(step, trainer)
    if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
        save_checkpoint(trainer, cfg, step, extra)
