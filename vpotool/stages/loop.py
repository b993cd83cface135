"""``vpotool loop``: OnlineVPO with the model resident. Each iteration samples K candidates per prompt with the
current policy, scores them, pairs the better against the worse and takes DPO steps (or ReFL / SCST steps), with
the model, reward and optimizer resident throughout. Every iteration writes the same manifests as the separate stages
(``RUN/iter-NNNN/{prompts,samples,scores,pairs}.parquet``); checkpoints close each iteration, so a rerun resumes.
Under torchrun or accelerate launch each process samples and scores its share of the prompts (shard manifests the
main process merges) and training runs under DDP; the main process writes the rest."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from vpotool.config import PairConfig, SampleConfig, ScoreConfig, save_config, sub_config
from vpotool.errors import VpoError, one_line
from vpotool.manifest import check_same_settings, merge_manifests, read_manifest, write_manifest
from vpotool.models import context_parallel
from vpotool.progress import console, sparkline
from vpotool.prompts import load_prompts
from vpotool.rewards import check_reward_frames
from vpotool.sampling import resolved_settings, use_settings
from vpotool.stages.common import output_folder, writer_lock
from vpotool.stages.pair import run_pair
from vpotool.stages.sample import run_sample
from vpotool.stages.score import run_score
from vpotool.training import fsdp
from vpotool.training.batches import load_rollouts
from vpotool.training.common import RUN_OPTIONS, batch_indices, finish_step, latest_checkpoint, setup
from vpotool.training.config import DpoConfig, LoopConfig, ReflConfig, ScstConfig
from vpotool.training.dpo import dpo_step, init_reference, latent_files, reference_adapters
from vpotool.training.lora import copy_adapter
from vpotool.training.refl import enable_vae_checkpointing, refl_step
from vpotool.training.reward import load_rollout_reward
from vpotool.training.scst import offline_step, old_adapters


@contextmanager
def sampling(trainer):
    """The policy in eval mode for sampling, called directly rather than through its DDP wrapper (processes sample
    their own shares, and a wrapped forward would wait for the others); training mode and the wrapper afterwards."""
    b, wrapped = trainer.backend, trainer.backend.denoiser
    b.denoiser = trainer.denoiser
    trainer.denoiser.eval()
    try:
        yield
    finally:
        trainer.denoiser.train()
        b.denoiser = wrapped


def shard_manifests(trainer, d: Path, samples: Path, scores: Path) -> tuple[Path, Path]:
    """Under several processes each (the first of each context group) wrote its share of the iteration's samples
    and scores; the main process merges them into ``samples.parquet`` and ``scores.parquet``, the manifests one
    process writes, and every process continues from those. Alone, or one context group: the manifests as written."""
    acc, (n, _) = trainer.accelerator, trainer.data_parallel
    if acc.num_processes == 1:
        return samples, scores
    acc.wait_for_everyone()  # every shard written
    if n == 1:  # one context group (--context-parallel): its first process wrote the manifests whole
        return samples, scores
    if acc.is_main_process:
        for kind in ("samples", "scores"):
            merge_manifests(sorted(d.glob(f"{kind}-*-of-{n:05d}.parquet")), d / f"{kind}.parquet")
    acc.wait_for_everyone()
    return d / "samples.parquet", d / "scores.parquet"


def iteration_prompts(prompts: list[tuple[str, str]], cfg: LoopConfig, it: int) -> list[tuple[str, str]]:
    """The prompts of iteration ``it``: the next slice of a seeded shuffle over the training prompts."""
    chosen = dict(prompts[i] for i in batch_indices(len(prompts), cfg.prompts_per_iter, it, cfg.seed))
    return list(chosen.items())


def method_config(cfg: LoopConfig, pairs: str):
    """The trainer config the loop's steps run under (checkpoints at the end of every iteration)."""
    common = dict(max_steps=cfg.max_steps, save_every=cfg.steps_per_iter, resume=False)
    if cfg.algo == "dpo":
        return sub_config(DpoConfig, cfg, pairs=pairs, **common)
    if cfg.algo == "refl":
        return sub_config(ReflConfig, cfg, **common)
    return sub_config(ScstConfig, cfg, group_size=cfg.candidates, **common)


# Options a resumed loop may change: they extend the run or change where and how fast it runs, not its results.
HARMLESS = RUN_OPTIONS | {"iterations", "sample_batch_size", "eval_prompts", "eval_seeds", "eval_seed"}


def check_loop_resumable(cfg: LoopConfig, out: Path) -> None:
    """Refuse, in one line naming the differing options, to resume a loop in ``out`` under options that change its
    results (prompts, model, reward, sampler settings, LoRA shape, learning rate, ...; see ``HARMLESS``), or at all
    under ``resume: false`` (``--no-resume``)."""
    import yaml

    saved_path = out / "loop.yaml"
    started = latest_checkpoint(out) is not None or any(out.glob("iter-*"))
    if started and not cfg.resume:
        raise VpoError(f"{out} already holds a started loop; rerun without --no-resume to continue it, or pass a "
                       "new --out to start over")  # fmt: skip
    if not (started and saved_path.is_file()):
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise VpoError(f"{saved_path} is not readable ({one_line(e)}); pass a new --out") from e
    now = {k: v for k, v in cfg.to_dict().items() if k not in HARMLESS}
    check_same_settings(out, saved if isinstance(saved, dict) else {}, now)


def run_loop(cfg: LoopConfig) -> Path:
    """Run ``cfg.iterations`` online iterations into ``cfg.out``, then compare base and aligned on held-out
    prompts. Returns the run folder. A rerun resumes from the last finished iteration; one process runs a loop
    folder at a time."""
    fsdp.refuse("loop", "each process samples its own share of the prompts")
    out = output_folder(cfg.out)
    with writer_lock(out):  # under several processes the main one holds it; the others write their shards only
        check_loop_resumable(cfg, out)
        return loop_into(cfg, out)


def loop_into(cfg: LoopConfig, out: Path) -> Path:
    """The body of :func:`run_loop` once ``out`` is checked and locked."""
    # --- setup: one backend, one reward, one trainer for the whole run
    prompts = load_prompts(cfg.prompts)
    logp = cfg.algo == "scst" and cfg.estimator == "logp"  # the one method that trains on stored trajectories
    noise_level = cfg.noise_level if cfg.noise_level is not None else (0.7 if logp else 0.0)
    mcfg = method_config(cfg, pairs=str(out / "iter-0000" / "pairs.parquet"))
    resuming = latest_checkpoint(out) is not None
    extra = ()  # the frozen adapters besides the policy: DPO's reference, NFT's sampling policy
    if cfg.algo in ("dpo", "scst"):
        extra = reference_adapters(mcfg) if cfg.algo == "dpo" else old_adapters(mcfg, reused=True)
    trainer = setup(sub_config(type(mcfg), mcfg, resume=resuming), None, extra)
    b, acc = trainer.backend, trainer.accelerator
    main, (world, rank) = acc.is_main_process, trainer.data_parallel
    say = console().print if main else (lambda *_: None)
    if cfg.algo == "refl" and cfg.vae_checkpointing:
        enable_vae_checkpointing(b)
    reward = load_rollout_reward(cfg, b.device, need_grad=cfg.algo == "refl")
    ref_mode = init_reference(trainer, mcfg) if cfg.algo == "dpo" else "base"
    settings = resolved_settings(cfg, b)
    check_reward_frames(cfg.reward, settings["frames"], "each candidate")
    use_settings(b, settings)
    if main:
        save_config(cfg, out / "loop.yaml")
    step, start_iter = trainer.start_step, trainer.start_step // cfg.steps_per_iter
    if resuming:
        say(f"resuming {out} at iteration {start_iter} (step {step})")

    # --- loop
    history = []
    for it in range(start_iter, cfg.iterations):
        if step >= cfg.max_steps:
            break
        t0, d = time.perf_counter(), out / f"iter-{it:04d}"
        rows = [dict(prompt_id=pid, prompt=text) for pid, text in iteration_prompts(prompts, cfg, it)]
        if main:
            write_manifest(d / "prompts.parquet", rows, "prompts", {"iteration": it})
        acc.wait_for_everyone()
        shard = f"{rank}/{world}"  # each process (context group) samples and scores its share of the prompts
        scfg = sub_config(
            SampleConfig, cfg, prompts=str(d / "prompts.parquet"), out=str(d), seed=cfg.seed * 100_003 + it,
            batch_size=cfg.sample_batch_size, save_trajectory=logp, shard=shard,
            **{**settings, "noise_level": noise_level},
        )  # fmt: skip
        if "old" in extra:  # the policy that samples this iteration: the old policy of its NFT steps
            copy_adapter(trainer.denoiser, "default", "old")
        with sampling(trainer):
            samples = run_sample(scfg, backend=b, layout=trainer.layout)
        scores = d / samples.name.replace("samples", "scores")
        if trainer.layout.writes:  # the other processes of its context group made the same videos
            run_score(
                ScoreConfig(samples=str(samples), out=str(scores), reward=cfg.reward, device=str(b.device)),
                rewards={cfg.reward: reward},
            )
        samples, scores = shard_manifests(trainer, d, samples, scores)
        sample_reward = mean_score(scores, cfg.reward_dimension)
        t_sample = time.perf_counter() - t0
        if cfg.algo == "dpo":
            if main:
                run_pair(
                    PairConfig(
                        samples=str(samples), scores=str(scores), out=str(d / "pairs.parquet"),
                        dimension=cfg.reward_dimension, strategy=cfg.pair_strategy, min_margin=cfg.min_margin,
                    )
                )  # fmt: skip
            acc.wait_for_everyone()
            pairs = d / "pairs.parquet"
            pair_rows = read_manifest(pairs, "pairs", "--pairs").to_pylist()
            files = latent_files(pairs, pair_rows, b, d / "encoded-latents")
        elif cfg.algo == "scst":
            rollouts = load_rollouts(samples, scores, mcfg, b)
            if "old" in extra:  # sampled by the policy as it stood at the iteration's start
                rollouts = dataclasses.replace(rollouts, sampler="old")
        last = {}
        for _ in range(cfg.steps_per_iter):
            if step >= cfg.max_steps:
                break
            if cfg.algo == "dpo":
                values, grad_norm = dpo_step(trainer, mcfg, pair_rows, files, step, ref_mode)
            elif cfg.algo == "refl":
                values, grad_norm = refl_step(trainer, mcfg, reward, [r["prompt"] for r in rows], settings, step)
            else:
                values, grad_norm = offline_step(trainer, mcfg, rollouts, step)
            step += 1
            last = {**values, "iteration": float(it), "sample_reward": sample_reward}
            finish_step(trainer, mcfg, step, last, grad_norm, None, extra)
        history.append(sample_reward)
        summary = f"iter {it + 1}/{cfg.iterations}  reward {sample_reward:.4f}"
        if "implicit_acc" in last:
            summary += f"  dpo loss {last['loss']:.4f}  acc {last['implicit_acc']:.2f}"
        elif "loss" in last:
            summary += f"  loss {last['loss']:.4f}"
        say(f"{summary}  sample {t_sample:.0f}s  total {time.perf_counter() - t0:.0f}s")

    # --- save and compare: the final checkpoint is written in the loop; the main process compares
    if history:
        say(f"{cfg.reward_dimension} reward per iteration: {sparkline(history)}")
    final = latest_checkpoint(out)
    eval_prompts = cfg.eval_prompts
    if eval_prompts is None:
        eval_prompts = default_eval_prompts(cfg.prompts)
    if main and final is not None and eval_prompts != "none":
        # the main process alone compares: under --context-parallel its denoiser runs unshared meanwhile
        with sampling(trainer), context_parallel.suspended(trainer.denoiser):
            compare(cfg, b, eval_prompts, final, reward)
    acc.wait_for_everyone()
    acc.end_training()  # ends the trackers and the process group: last
    return out


def default_eval_prompts(prompts: str) -> str:
    """What the loop compares on when --eval-prompts is not given: world:val after aligning on world:align (prompts
    of the same distribution it never trained on), world:heldout after any other world split, else nothing."""
    if prompts == "world:align":
        return "world:val"
    return "world:heldout" if prompts.startswith("world:") else "none"


def mean_score(scores: Path, dimension: str) -> float:
    """Mean of ``dimension`` over a scores manifest (the iteration's reward)."""
    values = read_manifest(scores, "scores", "--scores").column(dimension).to_pylist()
    if not values:
        raise VpoError(f"{scores} has no scores")
    return float(torch.tensor(values, dtype=torch.float64).mean())


def compare(cfg: LoopConfig, backend, prompts: str, checkpoint: Path, reward) -> None:
    """Base model vs the final adapter on held-out prompts (``RUN/eval``), printed as a table."""
    from vpotool.config import EvalConfig
    from vpotool.stages.eval import run_eval

    ecfg = sub_config(
        EvalConfig, cfg, out=str(Path(cfg.out) / "eval"), prompts=prompts, adapters=str(checkpoint),
        seeds=cfg.eval_seeds, seed=cfg.eval_seed, batch_size=cfg.sample_batch_size, device=str(backend.device),
        baseline="base",  # the loop's --baseline is SCST's; the comparison is against the base model
    )  # fmt: skip
    run_eval(ecfg, backend=backend, rewards={cfg.reward: reward})
