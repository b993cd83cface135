"""``train-dpo``: Diffusion-DPO on stored chosen/rejected latents, with the curriculum reference update of OnlineVPO.

The reference is the base model (the adapter disabled, no second copy), or a frozen second LoRA adapter ``ref``
when ``--ref-update-interval`` or ``--ref-adapter`` asks for one; either way it costs no extra denoiser weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from vpotool.config import save_config
from vpotool.errors import VpoError, first_line
from vpotool.latents import load_latents, save_latent
from vpotool.losses import DpoOutput, dpo_loss, per_sample_mse
from vpotool.manifest import read_manifest, resolve
from vpotool.models.base import cond_cat, latent_channels
from vpotool.models.context_parallel import check_tokens
from vpotool.progress import progress_bar
from vpotool.rollout import check_chunking, chunking_of, noised_input
from vpotool.training.common import batch_indices, finish_step, grad_sync, optimizer_step, setup
from vpotool.training.config import DpoConfig
from vpotool.training.lora import adapter_weights, copy_adapter, load_adapter_state, reference_mode
from vpotool.video import frames_to_tensor, read_video


def latent_files(pairs_path: Path, rows: list[dict], backend, cache_dir: Path) -> list[tuple[Path, Path]]:
    """The (chosen, rejected) latent files of each pair, checked for shape against the backend.

    A side without a latent file (people's labels on external videos) is encoded from its mp4 through the
    backend's VAE once, into ``cache_dir/<sample_id>.safetensors``, which later epochs and reruns reuse."""

    def one(row: dict, side: str) -> Path:
        rel = row.get(f"{side}_latent") or ""
        path = resolve(pairs_path, rel) if rel else None
        if path is not None and path.is_file():
            return path
        cached = Path(cache_dir) / f"{row[f'{side}_id']}.safetensors"
        if not cached.is_file():
            video = resolve(pairs_path, row[f"{side}_video"])
            frames = frames_to_tensor(read_video(video)).unsqueeze(0).to(backend.device, backend.dtype)
            with torch.no_grad():
                latent = backend.encode(frames)[0]
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_latent(cached, latent, {"sample_id": row[f"{side}_id"], "encoded_from": str(video)})
        return cached

    same = [r["pair_id"] for r in rows if r["chosen_id"] == r["rejected_id"]]
    if same:
        raise VpoError(
            f"{pairs_path}: {len(same)} pair(s) prefer a sample to itself (e.g. {same[0]}); drop them, or rebuild "
            "the pairs with `vpotool pair`"
        )
    files = [(one(r, "chosen"), one(r, "rejected")) for r in rows]
    shapes, rollouts = set(), set()
    for path in (p for pair in files for p in pair):
        try:
            with safe_open(str(path), "pt") as f:  # the header only: no tensor is read here
                shapes.add(tuple(f.get_slice("latents").get_shape()))
                rollouts.add(json.dumps(json.loads((f.metadata() or {}).get("config", "{}")).get("chunking")))
        except Exception as e:  # noqa: BLE001 (a damaged file of any kind is the same user problem)
            raise VpoError(
                f"unreadable latent file {path} ({first_line(e)}); rerun `vpotool sample` on its --out to rewrite "
                "it, or drop its pairs"
            ) from e
    if len(shapes) != 1:
        raise VpoError(
            f"{pairs_path}: pairs have latents of different shapes {sorted(shapes)}; train one size at a time"
        )
    for made_by in rollouts - {"null"}:  # sampled by an autoregressive rollout: it must be this model's
        check_chunking(json.loads(made_by), backend, f"{pairs_path}'s latents")
    if "null" in rollouts and chunking_of(backend) is not None:  # encoded videos: only whole chunks train
        chunking_of(backend).spans(next(iter(shapes))[1])
    channels, expected = next(iter(shapes))[0], latent_channels(backend)
    if channels != expected:
        raise VpoError(f"{pairs_path}: latents have {channels} channels, --model {backend.info.name} "
                       f"expects {expected}; were these pairs sampled with another model?")  # fmt: skip
    return files


def latent_shape_of(path: Path) -> tuple[int, ...]:
    """The ``(C, F, h, w)`` of a latent file, from its header."""
    with safe_open(str(path), "pt") as f:
        return tuple(f.get_slice("latents").get_shape())


def load_pair_latents(
    pairs_path: Path, rows: list[dict], backend, cache_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected latents, each ``[N, C, F, h, w]``, of ``rows`` (see :func:`latent_files`)."""
    files = latent_files(pairs_path, rows, backend, cache_dir)
    return load_latents([w for w, _ in files]), load_latents([r for _, r in files])


# Default --beta by what the denoiser predicts. epsilon / v: 5000, Diffusion-DPO's value for SD 1.5 and SDXL (Wallace
# et al. 2024; 2500 where the 0.5 is folded into beta). flow: the velocity target has twice the noise's variance and
# flow-model DPO runs report beta between about 100 and 2000; 500 is what the tiny model's loop was measured with
# (docs/training.md). Pass --beta to override.
DEFAULT_BETA = {"epsilon": 5000.0, "v": 5000.0, "flow": 500.0}


def dpo_beta(cfg, backend) -> float:
    """``cfg.beta``, or the default for the backend's prediction type when it is unset."""
    return cfg.beta if cfg.beta is not None else DEFAULT_BETA[backend.prediction]


def pair_loss(backend, denoiser, x0_w, x0_l, cond, seeds: list[int], cfg: DpoConfig, ref_mode: str) -> DpoOutput:
    """The Diffusion-DPO loss on one batch: winner and loser share noise and timestep; policy and reference run
    on the same inputs (policy with grad, reference without). ``x0_* [B, C, F, h, w]``; ``cond`` for B prompts;
    ``seeds`` one per example, so noise and timestep do not depend on how examples are batched or spread over
    processes."""
    inp = noised_input(backend, [x0_w, x0_l], seeds)
    x_t, t, n_ctx, target = inp.x_in, inp.t, inp.n_ctx, inp.target
    both = cond_cat(cond, cond)
    policy_w, policy_l = per_sample_mse(backend.predict(x_t, t, both)[:, :, n_ctx:], target).chunk(2)
    with torch.no_grad(), reference_mode(denoiser, ref_mode):
        ref_w, ref_l = per_sample_mse(backend.predict(x_t, t, both)[:, :, n_ctx:], target).chunk(2)
    return dpo_loss(policy_w, policy_l, ref_w, ref_l, dpo_beta(cfg, backend), cfg.loss_type, cfg.ipo_tau)


def reference_adapters(cfg: DpoConfig) -> tuple[str, ...]:
    """The frozen adapters besides the policy: ``("ref",)`` when the reference is an adapter (curriculum updates
    or ``--ref-adapter``), else none (the reference is the base model, the adapter disabled)."""
    return ("ref",) if (cfg.ref_update_interval or cfg.ref_adapter) else ()


def init_reference(trainer, cfg: DpoConfig) -> str:
    """Before the first step: the reference mode, ``base`` (adapter disabled) or ``ref`` (a frozen adapter). A
    ``ref`` adapter starts as ``--ref-adapter`` (and so does the policy, so the loss starts at ln 2) or as a copy
    of the fresh policy (``--init-adapter``'s weights, when given)."""
    if not reference_adapters(cfg):
        return "base"
    den = trainer.denoiser
    if trainer.start_step == 0:
        if cfg.ref_adapter:
            state = adapter_weights(den, cfg.ref_adapter, trainer.backend.info.name, "--ref-adapter")
            for name in ("default", "ref"):
                load_adapter_state(den, state, name)
        else:
            copy_adapter(den, "default", "ref")
    return "ref"


def dpo_step(trainer, cfg: DpoConfig, rows: list[dict], files: list, step: int, ref_mode: str):
    """One optimizer step (``cfg.grad_accum`` micro-batches of pairs ``rows`` with latents ``files``) from step
    ``step``; copies the policy into the reference when the curriculum says so. Returns ``(metrics, grad_norm)``."""
    b, acc, den = trainer.backend, trainer.accelerator, trainer.denoiser
    world, rank = trainer.data_parallel
    t0, outs = time.perf_counter(), []
    for micro in range(cfg.grad_accum):
        slot = (step * cfg.grad_accum + micro) * world + rank
        idx = batch_indices(len(rows), cfg.batch_size, slot, cfg.seed)
        seeds = [cfg.seed * 7_919 + 2 * (slot * cfg.batch_size + j) for j in range(len(idx))]
        cond = b.condition([rows[i]["prompt"] for i in idx])
        x0_w = load_latents([files[i][0] for i in idx]).to(b.device)
        x0_l = load_latents([files[i][1] for i in idx]).to(b.device)
        with grad_sync(trainer, last=micro == cfg.grad_accum - 1):
            out = pair_loss(b, den, x0_w, x0_l, cond, seeds, cfg, ref_mode)
            acc.backward(out.loss / cfg.grad_accum)
        outs.append(out)
    grad_norm = optimizer_step(trainer, cfg)
    ref_updated = bool(cfg.ref_update_interval) and (step + 1) % cfg.ref_update_interval == 0
    if ref_updated:
        copy_adapter(den, "default", "ref")
    fields = [k for k in DpoOutput._fields if k != "inside"]  # inside is per example; the rest are means
    values = {k: torch.stack([getattr(o, k) for o in outs]).mean().item() for k in fields}
    values.update(ref_updated=float(ref_updated), step_time=time.perf_counter() - t0)
    return values, grad_norm


def train_dpo(cfg: DpoConfig, backend=None, on_step=None) -> Path:
    """Train a LoRA adapter with Diffusion-DPO on ``cfg.pairs``; writes checkpoints and metrics under ``cfg.out``.

    ``on_step(step, trainer)`` is called after every optimizer step (for ``loop`` and tests)."""
    # --- setup
    pairs_path = Path(cfg.pairs)
    rows = read_manifest(pairs_path, "pairs", "--pairs").to_pylist()
    if not rows:
        raise VpoError(f"{pairs_path} has no pairs; run `vpotool pair` first")
    extra = reference_adapters(cfg)
    trainer = setup(cfg, backend, extra, prompts=dict.fromkeys(r["prompt"] for r in rows))
    b, acc = trainer.backend, trainer.accelerator
    files = latent_files(pairs_path, rows, b, Path(cfg.out) / "encoded-latents")  # read per batch, not all at once
    check_tokens(b, latent_shape_of(files[0][0]), trainer.layout.degree)
    ref_mode = init_reference(trainer, cfg)
    cfg.beta = dpo_beta(cfg, b)  # the resolved config records the value used
    save_config(cfg, Path(cfg.out) / "train-dpo.yaml")

    # --- loop
    step = trainer.start_step
    with progress_bar("train-dpo", total=cfg.max_steps) as advance:
        advance(step)
        while step < cfg.max_steps:
            values, grad_norm = dpo_step(trainer, cfg, rows, files, step, ref_mode)
            step += 1
            finish_step(trainer, cfg, step, values, grad_norm, on_step, extra)
            advance(1)

    # --- save (the final checkpoint is written in the loop)
    acc.end_training()
    return Path(cfg.out)
