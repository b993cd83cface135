"""The ``sample`` stage: K candidate videos per prompt from the current policy -> samples.parquet, mp4s, latents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vpotool.config import SampleConfig, save_config
from vpotool.errors import VpoError
from vpotool.latents import save_latent
from vpotool.manifest import RowWriter, digest, merge_manifests, remove_stale_temps
from vpotool.models.context_parallel import Layout, check_tokens, launch_layout
from vpotool.progress import progress_bar
from vpotool.prompts import load_prompts
from vpotool.sampling import resolved_settings, use_settings
from vpotool.stages.common import output_folder, shard_slice, shard_suffix, video_seed, writer_lock
from vpotool.video import to_uint8, write_video


def trajectory_tensors(traj) -> list[dict]:
    """Per video of a stochastic :class:`~vpotool.sampling.Trajectory` run with ``keep_states``: ``states``
    ``[S + 1, C, F, h, w]`` (x_0 is the initial noise, x_S the final latent) and ``logps [S]``, as
    :func:`save_latent` stores them for offline ``train-scst``."""
    states = torch.stack([s.cpu() for s in traj.states], 1)  # on the CPU: no second copy in GPU memory
    return [{"states": s, "logps": lp} for s, lp in zip(states, traj.logps.cpu(), strict=True)]


@torch.no_grad()
def generate(backend, prompts: list[str], seeds: list[int], settings: dict, cond=None, keep_states: bool = False):
    """Sample one video per (prompt, seed) in a single batched sampler run.

    Returns ``(latents [B, C, F, h, w], frames [B, T, 3, H, W] in [0, 1])``. ``cond`` may pass precomputed
    conditioning for ``prompts``. ``keep_states=True`` adds a third element, the sampler's
    :class:`~vpotool.sampling.Trajectory` with its S + 1 ``states`` (and ``logps [B, S]`` when stochastic).
    """
    from vpotool.rollout import generate as run
    from vpotool.rollout import initial_noise

    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    noise = initial_noise(backend, shape, seeds)
    cond = cond if cond is not None else backend.encode_prompts(prompts)
    uncond = None
    if settings["guidance"] != 1.0:
        negative = settings.get("negative_prompt") or ""
        uncond = backend.encode_negative(len(prompts), negative)
    scheduler = getattr(backend, "pipeline_scheduler", None)
    deterministic = not settings["noise_level"] and not keep_states
    pipeline = settings.get("sampler") == "pipeline" and scheduler is not None and deterministic
    traj = run(
        backend, cond, noise, steps=settings["steps"], guidance=settings["guidance"], uncond=uncond,
        noise_level=settings["noise_level"], step_seeds=seeds, keep_states=keep_states,
        scheduler=scheduler if pipeline else None,
    )  # fmt: skip
    frames = backend.decode(traj.latents.to(backend.dtype))
    frames = frames[:, : settings["frames"], :, : settings["height"], : settings["width"]]
    return (traj.latents, frames, traj) if keep_states else (traj.latents, frames)


def rollout_record(backend, settings: dict) -> dict | None:
    """The chunking of ``backend``'s rollouts as manifests and latent files record it (None: bidirectional), after
    checking that ``settings["frames"]`` are a whole number of its chunks."""
    from vpotool.rollout import chunking_of

    chunking = chunking_of(backend)
    if chunking is None:
        return None
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    try:
        chunking.spans(shape[1])
    except VpoError as e:
        raise VpoError(f"--frames {settings['frames']} for --model {backend.info.name}: {e}") from None
    return chunking.as_dict()


def check_sampling_memory(backend, settings: dict, cfg: SampleConfig) -> None:
    """Refuse up front (see :mod:`vpotool.memory`) a request whose videos of one denoiser call (a prompt's
    candidates always go together) could not fit the device, e.g. ``--candidates 1000000000`` or ``--height 16000
    --width 16000``."""
    from vpotool.memory import check_fits, video_call_bytes

    f, h, w = settings["frames"], settings["height"], settings["width"]
    videos = max(cfg.batch_size // cfg.candidates, 1) * cfg.candidates
    need = video_call_bytes(videos, backend.latent_shape(f, h, w), f, h, w)
    what = f"sampling {videos} videos of {f} frames of {h}x{w} at once (--candidates {cfg.candidates}, --batch-size "
    check_fits(need, backend.device, what + f"{cfg.batch_size}) for their latents and frames alone",
               "lower --candidates, --batch-size, --frames, --height or --width")  # fmt: skip


def run_sample(cfg: SampleConfig, backend=None, layout: Layout | None = None) -> Path:
    """Write ``cfg.out/samples.parquet`` (one row per video), ``videos/*.mp4`` and ``latents/*.safetensors``
    (with ``--save-trajectory`` also holding each video's sampler states and step log-probabilities).

    Rerunning on the same ``--out`` skips videos already recorded; rows are flushed after every batch. A rerun
    under settings that change the videos (prompts, model, sampler settings, seed, ...) is refused. One process
    writes a manifest at a time (shards write their own). ``backend`` may pass an already loaded model (``loop``
    keeps one resident). ``layout``: this process's context group (``--context-parallel``; by default as the launch
    and ``cfg.context_parallel`` make it), whose processes sample together while the first alone writes.
    """
    layout = layout or launch_layout(cfg.context_parallel, cfg.model)
    every = load_prompts(cfg.prompts)
    if cfg.adapter and backend is None:  # before any folder or model: a folder without LoRA weights stops here
        from vpotool.training.lora import adapter_metadata

        adapter_metadata(cfg.adapter)
    prompts = shard_slice(every, cfg.shard)
    if not prompts:
        n = len(every)
        raise VpoError(
            f"--shard {cfg.shard} has no prompts: {cfg.prompts} holds {n} prompt{'s' * (n != 1)}, so only shards "
            f"0 to {n - 1} get any; split into at most {n} shards"
        )
    out = output_folder(cfg.out)
    suffix = shard_suffix(cfg.shard)
    with writer_lock(out / f"samples{suffix}.parquet"):
        return sample_into(cfg, out, suffix, every, prompts, backend, layout)


def sample_into(
    cfg: SampleConfig, out: Path, suffix: str, every: list, prompts: list, backend=None, layout: Layout = Layout()
) -> Path:
    """The body of :func:`run_sample` once ``out`` is checked and locked: ``prompts`` are this shard's of
    ``every``; a process that does not write its group's outputs (``layout.writes``) computes them beside the one
    that does."""
    from vpotool.models import context_parallel, load_backend, resolve_device

    writes = layout.writes
    for sub in ("videos", "latents"):
        if writes:
            output_folder(out / sub)
            remove_stale_temps(out / sub)  # a killed run's half-written files
    if backend is None:
        device = resolve_device(cfg.device)
        backend = load_backend(cfg.model, cfg.model_path, device, cfg.dtype, cfg.model_options)
        if cfg.adapter:
            from vpotool.training.lora import load_adapter

            load_adapter(backend, cfg.adapter)
        if layout.degree > 1:  # the adapter's layers are in place: the plan hooks them
            context_parallel.init_process_group(device)
            context_parallel.enable(backend, layout)
    settings = resolved_settings(cfg, backend)
    m = backend.size_multiple
    if settings["height"] % m or settings["width"] % m:
        raise VpoError(
            f"--height and --width must be multiples of {m} for --model {backend.info.name} "
            f"(got {settings['height']}x{settings['width']})"
        )
    check_sampling_memory(backend, settings, cfg)
    shape = backend.latent_shape(settings["frames"], settings["height"], settings["width"])
    check_tokens(backend, shape, layout.degree)
    chunking = rollout_record(backend, settings)
    use_settings(backend, settings)
    cfg = dataclasses.replace(cfg, **settings)  # record the resolved values, not "model default"
    model_id = {"model": backend.info.name, "model_path": backend.info.path, "adapter": backend.info.adapter}
    resume_keys = {
        **settings, **model_id, "chunking": chunking,
        "seed": cfg.seed, "save_trajectory": cfg.save_trajectory, "prompts": digest(every),
        "candidates": cfg.candidates, "dtype": cfg.dtype, "crf": cfg.crf, "model_options": cfg.model_options,
    }  # fmt: skip
    writer = RowWriter(
        out / f"samples{suffix}.parquet", "samples", {**cfg.to_dict(), "chunking": chunking}, compare=resume_keys
    )
    if writes:
        save_config(cfg, out / f"sample{suffix}.yaml")  # after the resume check: a refused run leaves it alone

    # the sampler and negative prompt are recorded in the config and the latent files, not as columns
    columns = {k: v for k, v in settings.items() if k not in ("sampler", "negative_prompt")}
    jobs = [(pid, text, k) for pid, text in prompts for k in range(cfg.candidates)]
    todo = [j for j in jobs if (f"{j[0]}-c{j[2]:02d}",) not in writer.done]
    per_call = max(cfg.batch_size // cfg.candidates, 1) * cfg.candidates
    with progress_bar(f"sample {backend.info.name}", total=len(jobs)) as advance:
        advance(len(jobs) - len(todo))
        for start in range(0, len(todo), per_call):
            batch = todo[start : start + per_call]
            seeds = [video_seed(cfg.seed, pid, k) for pid, _, k in batch]
            texts = [t for _, t, _ in batch]
            latents, frames, *traj = generate(backend, texts, seeds, settings, keep_states=cfg.save_trajectory)
            if not writes:
                advance(len(batch))
                continue
            extras = trajectory_tensors(traj[0]) if traj else [{}] * len(batch)
            rows = []
            for (pid, text, k), seed, lat, vid, extra in zip(batch, seeds, latents, frames, extras, strict=True):
                sid = f"{pid}-c{k:02d}"
                write_video(out / "videos" / f"{sid}.mp4", to_uint8(vid), settings["fps"], cfg.crf)
                meta = {"sample_id": sid, "prompt": text, "seed": seed,
                        "config": json.dumps({**settings, "chunking": chunking})}  # fmt: skip
                save_latent(out / "latents" / f"{sid}.safetensors", lat, meta, extra)
                rows.append(
                    dict(
                        sample_id=sid, prompt_id=pid, prompt=text, candidate=k, seed=seed, **model_id,
                        **{**columns, "frames": vid.shape[0]},  # what the VAE gave, e.g. 4k + 1 frames
                        video=f"videos/{sid}.mp4", latent=f"latents/{sid}.safetensors",
                    )
                )  # fmt: skip
            writer.add(rows)
            writer.flush()
            advance(len(batch))
    if not writes:
        return writer.path
    if not writer.rows:
        raise VpoError("nothing was sampled")
    writer.flush()
    return writer.path


def launch_sample(cfg: SampleConfig) -> Path:
    """``vpotool sample``: :func:`run_sample` in one process. Under torchrun or accelerate launch the processes form
    context groups of ``cfg.context_parallel`` (one process each without it); each group samples an interleaved
    share of the prompts, which its first process writes (``samples-GGGGG-of-NNNNN.parquet`` when there are several
    groups), and the main process merges the shares into the ``samples.parquet`` one process writes."""
    import torch.distributed as dist

    from vpotool.models.context_parallel import init_process_group, process_device

    layout = launch_layout(cfg.context_parallel, cfg.model)
    if layout.world == 1:
        return run_sample(cfg)
    groups = layout.groups
    if groups > 1 and cfg.shard != "0/1":
        raise VpoError(
            f"--shard {cfg.shard}: the {groups} context groups of this launch split the prompts already; pass "
            f"--shard 0/1, or launch one group (--context-parallel {layout.world})"
        )
    n = len(load_prompts(cfg.prompts))
    if groups > n:
        raise VpoError(f"this launch has {groups} context groups for {n} prompt{'s' * (n != 1)}: launch at most {n} "
                       "groups (fewer processes, or a larger --context-parallel)")  # fmt: skip
    device = process_device(cfg.device)
    init_process_group(device)
    shard = f"{layout.group}/{groups}" if groups > 1 else cfg.shard
    part = run_sample(dataclasses.replace(cfg, device=device, shard=shard), layout=layout)
    dist.barrier()  # every group's share written
    if groups == 1:
        return part
    merged = Path(cfg.out) / "samples.parquet"
    if layout.rank == 0:
        parts = [Path(cfg.out) / f"samples{shard_suffix(f'{g}/{groups}')}.parquet" for g in range(groups)]
        with writer_lock(merged):
            merge_manifests(parts, merged)
    dist.barrier()
    return merged
