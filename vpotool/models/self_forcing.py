"""Self-Forcing / CausVid (causal Wan 2.1 T2V 1.3B): a Self-Forcing or CausVid generator checkpoint (original Wan
key layout) in diffusers' ``WanTransformer3DModel`` with block-causal self-attention, and its few-step sampler.

Self-Forcing's inference (``guandeh17/Self-Forcing``, ``pipeline/causal_inference.py``) makes 21 latent frames in
blocks of 3, each block denoised in 4 steps while it attends to the earlier blocks through a KV cache, then run once
more, clean, at the context timestep to fill the cache. vpotool's rollout recomputes the history instead: the
window [earlier blocks, clean; this block, noised] goes through the transformer with a timestep per frame, and block
k's tokens attend to blocks <= k (:class:`BlockCausalAttnProcessor`). Each earlier block's keys and values are then
exactly the cached ones (computed on that clean block beside the blocks before it), so the chunk's output is the
KV cache's; the cost is recomputing the history at every step (:data:`SELF_FORCING_CHUNKING` bounds it at 21
latent frames, the cache Self-Forcing was trained with).
"""

from __future__ import annotations

import os

import torch

from vpotool.errors import VpoError, first_line
from vpotool.models.base import Chunking, Conditioning, NoiseSchedule, SamplingDefaults, noise_like
from vpotool.models.wan import WanBackend, WanVaeCodec, wan_parts

SELF_FORCING_DEFAULTS = SamplingDefaults(frames=81, height=480, width=832, fps=16, steps=4, guidance=1.0)
FRAMES_PER_BLOCK = 3
CACHE_FRAMES = 21  # the KV cache of global attention: the 21 latent frames the model was trained on


# --model-options context_mode: how Self-Forcing's two pipelines show a block to the blocks after it
CONTEXT_MODES = {"inference": "label", "training": "once"}


def self_forcing_chunking(context_noise: float = 0.0, context_mode: str = "inference") -> Chunking:
    """Blocks of 3 latent frames, each beside all earlier frames up to the 21-frame cache (18 frames of context).
    ``context_noise``: the context's timestep (0..1000, Self-Forcing's ``context_noise``); ``context_mode``:
    ``inference`` gives the clean block labelled with that timestep, as ``CausalInferencePipeline`` fills its KV
    cache; ``training`` noises the block once to it, as ``SelfForcingTrainingPipeline`` does."""
    if not 0 <= float(context_noise) < 1000:
        raise VpoError(f"--model-options context_noise={context_noise}: a timestep in [0, 1000) (Self-Forcing uses 0)")
    if context_mode not in CONTEXT_MODES:
        raise VpoError(f"--model-options context_mode={context_mode}: one of {', '.join(CONTEXT_MODES)} "
                       "(Self-Forcing's inference or training pipeline)")  # fmt: skip
    return Chunking(
        first=FRAMES_PER_BLOCK, chunk=FRAMES_PER_BLOCK, context=CACHE_FRAMES - FRAMES_PER_BLOCK,
        context_noise=float(context_noise) / 1000.0, context_mode=CONTEXT_MODES[context_mode],
    )  # fmt: skip


def self_forcing_schedule(step_list, shift: float, warp: bool = True, train_steps: int = 1000) -> NoiseSchedule:
    """Self-Forcing's grid for a ``denoising_step_list`` (e.g. 1000, 750, 500, 250): its flow scheduler's training
    sigmas ``shift * s / (1 + (shift - 1) * s)`` on ``s = linspace(1, 0, train_steps + 1)[:-1]`` (float32, as
    ``utils/scheduler.py`` computes them). With ``warp`` step t is grid point ``train_steps - t`` (t = 750 at shift 5:
    sigma 0.9375, timestep 937.5); without, the model sees t itself and its sigma is the grid point nearest t / 1000
    (``warp_denoising_step: false``). Returns timesteps ``[S]`` and sigmas ``[S + 1]`` ending at 0 (the last step
    jumps to x0)."""
    s = torch.linspace(1.0, 0.0, train_steps + 1)[:-1]
    grid = shift * s / (1 + (shift - 1) * s)
    steps = torch.tensor([float(t) for t in step_list])
    if warp:
        sigmas = grid[train_steps - steps.long()]
        timesteps = sigmas * train_steps
    else:
        timesteps = steps
        sigmas = grid[(grid[None] * train_steps - steps[:, None]).abs().argmin(1)]
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    return NoiseSchedule(timesteps=timesteps, alphas=1.0 - sigmas, sigmas=sigmas)


def draw_noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like [B, ...]``: row i from ``generator[i]`` (a list, the rollout's
    per-video streams), else from ``generator`` or the global generator."""
    if isinstance(generator, list | tuple):
        return noise_like(like, generator)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def check_steps(steps: int, schedule: NoiseSchedule) -> None:
    """Refuse a step count other than the grid's, in one line."""
    if steps != len(schedule):
        raise VpoError(
            f"--steps {steps}: this Self-Forcing model denoises each block in the {len(schedule)} steps of its "
            f"denoising_steps; pass --steps {len(schedule)}, or --model-options denoising_steps= of {steps} timesteps"
        )


class SelfForcingSampler:
    """Self-Forcing's few-step sampler, stepped by the rollout as a diffusers scheduler (``--sampler pipeline``).

    At step i the model's flow gives ``x0 = x - sigma_i * flow`` (in float64, as Self-Forcing converts it); every
    step but the last re-noises x0 with fresh noise to the next sigma, ``(1 - sigma') * x0 + sigma' * z``, and the
    last returns x0. ``step`` takes the rollout's per-video generators, so a seed gives the same video."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.set_timesteps(len(schedule))

    def set_timesteps(self, steps: int, device=None) -> None:
        check_steps(steps, self.schedule)
        self.timesteps = self.schedule.timesteps.to(device)
        self.sigmas = self.schedule.sigmas.to(device)
        self._index = 0

    def step(self, model_output, timestep, sample, return_dict: bool = False, generator=None):
        s, s_next = self.sigmas[self._index], self.sigmas[self._index + 1]
        self._index += 1
        x0 = (sample.double() - s.double() * model_output.double()).float()
        prev = x0 if s_next == 0 else (1 - s_next) * x0 + s_next * draw_noise(x0, generator)
        return (prev,)


class BlockLayout:
    """How many tokens a block of latent frames holds in the current forward pass; the backend sets
    ``tokens_per_frame`` before calling the transformer (the attention processors see flat token sequences)."""

    def __init__(self, frames_per_block: int):
        self.frames_per_block = frames_per_block
        self.tokens_per_frame: int | None = None

    @property
    def block_tokens(self) -> int:
        if self.tokens_per_frame is None:
            raise RuntimeError("the block-causal transformer was called without its frame layout; call predict()")
        return self.frames_per_block * self.tokens_per_frame


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``x [B, S, H, D]`` (interleaved pairs), as diffusers' ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BlockCausalAttnProcessor:
    """Self-attention of a ``WanTransformer3DModel`` block in which the tokens of block k of latent frames attend to
    blocks 0..k only: the attention Self-Forcing's KV cache computes. Each block's queries attend, unmasked, to the
    keys up to its own end, so memory stays that of ordinary attention (no ``[S, S]`` mask)."""

    def __init__(self, layout: BlockLayout):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.layout = layout
        self._attention_backend = WanAttnProcessor._attention_backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("BlockCausalAttnProcessor is for the blocks' unmasked self-attention (attn1) only")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        n, total = self.layout.block_tokens, hidden_states.shape[1]
        out = [
            dispatch_attention_fn(
                query[:, a : a + n], key[:, : a + n], value[:, : a + n], backend=self._attention_backend
            )
            for a in range(0, total, n)
        ]
        hidden_states = torch.cat(out, 1).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class Float64Timesteps(torch.nn.Module):
    """Wan's sinusoidal timestep embedding ``[cos, sin]`` computed in float64, as Wan's and Self-Forcing's code
    compute it; diffusers' ``Timesteps`` multiplies in float32, which puts the phases of timesteps near 1000 off by
    about 6e-5 (1e-5 in a tiny model's flow, measured against Self-Forcing's code)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
        phases = timesteps.double()[:, None] * freqs[None]
        return torch.cat([torch.cos(phases), torch.sin(phases)], 1).float()


def make_block_causal(transformer, frames_per_block: int) -> BlockLayout:
    """Give every block's self-attention of ``transformer`` (a ``WanTransformer3DModel``) the block-causal
    processor; returns the layout the caller sets before each forward."""
    layout = BlockLayout(frames_per_block)
    for block in transformer.blocks:
        block.attn1.set_processor(BlockCausalAttnProcessor(layout))
    return layout


class SelfForcingBackend(WanBackend):
    """A Wan backend whose transformer is block-causal over blocks of latent frames and takes a timestep per frame
    (a timestep per token for diffusers: each frame's modulation, as Self-Forcing's ``CausalWanModel``), with the
    :class:`Chunking` of its rollouts and its few-step sampler as ``pipeline_scheduler``."""

    def __init__(self, *, chunking: Chunking, schedule: NoiseSchedule, **parts):
        super().__init__(**parts)
        self.chunking = chunking
        self._schedule = schedule
        self.pipeline_scheduler = SelfForcingSampler(schedule)
        self.layout = make_block_causal(self.model, chunking.chunk)
        embedder = self.model.condition_embedder
        embedder.timesteps_proj = Float64Timesteps(embedder.timesteps_proj.num_channels)

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        """Self-Forcing's grid (the rollout's steps of vpotool's flow sampler run on it); ``steps`` must be its
        length."""
        check_steps(steps, self._schedule)
        return self._schedule

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow ``[B, C, F, h, w]``; ``timesteps [B]`` (every frame alike) or ``[B, F]``. The frames form blocks of
        ``chunking.chunk`` from the first, so the window must start on a block (the rollout's do)."""
        b, _, f, h, w = x_t.shape
        _, p_h, p_w = self.model.config.patch_size  # one frame a token (checked when loading)
        tokens = (h // p_h) * (w // p_w)
        t = timesteps.to(self.device, torch.float32)
        t = t[:, None].expand(b, f) if t.ndim == 1 else t
        self.layout.tokens_per_frame = tokens
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t.repeat_interleave(tokens, dim=1),  # frame-major, as the transformer flattens its patches
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]


WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def generator_state_dict(path: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator of a Self-Forcing / CausVid checkpoint (``.pt``: ``{"generator_ema": ..., "generator": ...}``,
    or a bare state dict; ``.safetensors``) in the original Wan layout, without the ``model.`` prefix of
    Self-Forcing's wrapper. ``ema`` takes ``generator_ema`` when the checkpoint has one."""
    if not path:
        raise VpoError(
            "--model self-forcing needs its generator checkpoint: --model-options checkpoint=PATH.pt "
            "(e.g. Self-Forcing's self_forcing_dmd.pt), with --model-path a Wan2.1-T2V-1.3B diffusers folder"
        )
    if not os.path.isfile(path):
        raise VpoError(f"Self-Forcing checkpoint not found: {path} (pass --model-options checkpoint=PATH.pt)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            ckpt = load_file(path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and safetensors errors have no common base
        raise VpoError(f"could not read the Self-Forcing checkpoint {path}: {first_line(e)}") from e
    if not isinstance(ckpt, dict):
        raise VpoError(f"{path} holds a {type(ckpt).__name__}, not a state dict; pass a Self-Forcing generator .pt")
    keys = ("generator_ema", "generator") if ema else ("generator",)
    for key in keys:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        if not torch.is_tensor(v):
            continue
        for part in WRAPPER_PARTS:
            k = k.replace(part, "")
        state[k.removeprefix("model.")] = v
    if "head.modulation" not in state or "blocks.0.self_attn.q.weight" not in state:
        have = ", ".join(sorted(k for k in ckpt if not torch.is_tensor(ckpt[k]))[:4]) or ", ".join(list(ckpt)[:3])
        raise VpoError(
            f"{path} holds no Wan generator in the original layout (no head.modulation / blocks.0.self_attn.q.weight; "
            f"it has {have or 'no keys'}); pass a Self-Forcing or CausVid generator checkpoint"
        )
    return state


def load_generator(path: str, checkpoint: str, ema: bool, dtype):
    """``WanTransformer3DModel`` of ``path/transformer/config.json`` (the Wan 2.1 folder) holding the checkpoint's
    generator, converted from the original layout by diffusers' single-file converter; the folder's own transformer
    weights are never read."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = generator_state_dict(checkpoint, ema)
    try:
        config = WanTransformer3DModel.load_config(path, subfolder="transformer")
    except (OSError, ValueError) as e:
        raise VpoError(
            f"no transformer/config.json in {path}: {first_line(e)}; --model-path is a Wan 2.1 T2V diffusers folder"
        ) from e
    if tuple(config.get("patch_size", (1, 2, 2)))[0] != 1:
        raise VpoError(f"{path}/transformer/config.json patches several frames a token; a Wan 2.1 folder has one")
    with init_empty_weights():
        transformer = WanTransformer3DModel.from_config(config)
    converted = {k: v.to(dtype) for k, v in convert_wan_transformer_to_diffusers(state).items()}
    try:
        transformer.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise VpoError(
            f"{checkpoint} does not fit the Wan transformer of {path}/transformer/config.json ({why}); pass the "
            "Wan diffusers folder the generator was trained from (Wan2.1-T2V-1.3B for Self-Forcing and CausVid)"
        ) from e
    return transformer.eval()


def load_self_forcing(
    path: str, device="cpu", dtype=torch.float32, checkpoint: str = "", ema: bool = True, context_noise: float = 0.0,
    denoising_steps=(1000, 750, 500, 250), warp: bool = True, shift: float = 5.0, context_mode: str = "inference",
) -> SelfForcingBackend:  # fmt: skip
    """The Self-Forcing / CausVid generator ``checkpoint`` with the VAE, UMT5 text encoder and tokenizer of the Wan
    2.1 diffusers folder ``path``. The options are Self-Forcing's config, ``denoising_steps``
    (``denoising_step_list``), ``warp`` (``warp_denoising_step``), ``shift`` (``timestep_shift``),
    ``context_noise`` and ``context_mode`` (:func:`self_forcing_chunking`), with ``configs/self_forcing_dmd.yaml``'s
    values by default; ``ema`` as its README's inference command (``--use_ema``)."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from vpotool.models.loading import load_component

    if isinstance(denoising_steps, str):
        denoising_steps = denoising_steps.split(",")
    try:
        step_list = [float(t) for t in denoising_steps]
    except (TypeError, ValueError):
        step_list = []
    if not step_list or any(not 0 < t <= 1000 for t in step_list) or step_list != sorted(step_list, reverse=True):
        given = ",".join(map(str, denoising_steps)) if isinstance(denoising_steps, list | tuple) else denoising_steps
        raise VpoError(
            f"--model-options denoising_steps={given}: decreasing timesteps in (0, 1000] joined by commas, "
            "e.g. 1000,750,500,250"
        )
    chunking = self_forcing_chunking(context_noise, context_mode)
    name = "self-forcing"
    if path and (not os.path.exists(str(path)) or os.path.isdir(str(path)) and not os.listdir(str(path))):
        # the folder first: a missing or empty --model-path is the mistake to name, not the checkpoint beside it
        raise VpoError(f"model folder not found or empty: {path} (--model-path: a Wan2.1-T2V-1.3B diffusers folder)")
    transformer = load_generator(path, checkpoint, ema, dtype).to(device)
    vae = load_component(AutoencoderKLWan, path, "vae", name, dtype=dtype).to(device).eval()
    text_encoder = load_component(UMT5EncoderModel, path, "text_encoder", name, dtype=dtype).to(device).eval()
    tokenizer = load_component(AutoTokenizer, path, "tokenizer", name)
    parts = wan_parts(
        path, name, transformer, WanVaeCodec(vae), text_encoder, tokenizer, SELF_FORCING_DEFAULTS, (None, None),
        float(shift), device, dtype,
    )  # fmt: skip
    schedule = self_forcing_schedule(step_list, float(shift), bool(warp))
    return SelfForcingBackend(chunking=chunking, schedule=schedule, **parts)
