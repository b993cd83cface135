"""The model-backend protocol: one video model family behind the handful of calls vpotool's sampler and trainers need.

Conventions shared by every backend:
- latents are ``[B, C, F, h, w]`` (channels before frames), whatever the family uses inside;
- pixel frames are float in [0, 1], ``[B, T, C, H, W]``;
- the forward process is ``x_t = alpha_t * x0 + sigma_t * noise``; a backend reports its own
  ``(alpha, sigma)`` at its native timesteps, and what its denoiser predicts (``prediction``):
  ``"flow"`` (velocity ``noise - x0``), ``"epsilon"`` (the noise) or ``"v"`` (``alpha * noise - sigma * x0``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch

from vpotool.errors import VpoError

Conditioning = dict[str, torch.Tensor]
"""Text conditioning for a batch: the tensors the denoiser takes, every one batch-first."""


@dataclass(frozen=True)
class SamplingDefaults:
    """A family's usual generation settings; stage flags override them."""

    frames: int
    height: int
    width: int
    fps: int
    steps: int
    guidance: float


@dataclass
class NoiseSchedule:
    """The sampling grid for a number of steps, noisiest first.

    ``timesteps[i]`` is the model-native timestep of step i; ``alphas[i], sigmas[i]`` its
    coefficients. The grids have one more entry than ``timesteps``: the final, clean point
    (usually alpha = 1, sigma = 0) that the last step lands on.
    """

    timesteps: torch.Tensor  # [S] float32
    alphas: torch.Tensor  # [S + 1] float32
    sigmas: torch.Tensor  # [S + 1] float32

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass
class ModelInfo:
    """What a manifest records about the model that made a sample."""

    name: str
    path: str
    adapter: str = ""
    extra: dict = field(default_factory=dict)


CONTEXT_MODES = ("fresh", "label", "once")  # see Chunking


@dataclass(frozen=True)
class Chunking:
    """How an autoregressive rollout cuts a video, in latent frames.

    The first chunk is ``first`` frames denoised together without context; every later chunk is ``chunk`` frames
    denoised beside the last ``context`` frames already made. ``context_noise`` is the flow sigma the context is
    labelled with, and re-noised to, before the model sees it (0: clean context, as teacher forcing trained it);
    ``context_mode`` says how: ``fresh``, re-noised with fresh noise at every step (SkyReels-V2's
    ``addnoise_condition``); ``label``, given clean and only labelled with that timestep (Self-Forcing's inference,
    whose KV cache is filled from the clean block at ``context_noise``); ``once``, noised once when it is made and
    seen so by every later chunk (Self-Forcing's training pipeline, which noises each block once for its cache).

    SkyReels-V2 Diffusion Forcing's asynchronous mode (:mod:`vpotool.diffusion_forcing`): ``ar_step > 0`` staggers
    a chunk's denoising over its causal blocks of ``causal_block`` frames, each block ``ar_step`` steps behind the
    one before; ``causal_block > 1`` also makes the model's attention block-causal. ``short_last``: a video that
    ends part way through a chunk ends with a shorter chunk (and one shorter than ``first`` is one chunk), as
    SkyReels-V2's pipeline makes them; without it such lengths are refused. It says what lengths the model takes,
    not how a video was made, so chunkings are compared and recorded without it."""

    first: int
    chunk: int
    context: int
    context_noise: float = 0.0
    ar_step: int = 0
    causal_block: int = 1
    short_last: bool = field(default=False, compare=False)
    context_mode: str = "fresh"

    def __post_init__(self):
        if self.first < 1 or self.chunk < 1 or self.context < 0:
            raise VpoError(f"chunking needs first >= 1, chunk >= 1 and context >= 0 latent frames (got {self})")
        if not 0.0 <= self.context_noise < 1.0:
            raise VpoError(f"context noise must be a flow sigma in [0, 1) (got {self.context_noise})")
        if self.context_mode not in CONTEXT_MODES:
            raise VpoError(f"context mode must be one of {', '.join(CONTEXT_MODES)} (got {self.context_mode})")
        blocks = (self.first, self.chunk, self.context)
        if self.ar_step < 0 or self.causal_block < 1 or any(n % self.causal_block for n in blocks):
            raise VpoError(f"chunking needs ar_step >= 0 and causal blocks that divide its chunks (got {self})")

    @property
    def window(self) -> int:
        """Latent frames the model sees at once: the most memory a chunk takes."""
        return max(self.first, self.context + self.chunk)

    def spans(self, latent_frames: int) -> list[tuple[int, int]]:
        """``[start, end)`` latent frames of each chunk of a video of ``latent_frames``; a video that is not the
        first chunk plus a whole number of chunks is refused, unless ``short_last`` (then only lengths that are not
        whole causal blocks are)."""
        if self.short_last and latent_frames >= 1 and not latent_frames % self.causal_block:
            if latent_frames <= self.first:
                return [(0, latent_frames)]
            starts = range(self.first, latent_frames, self.chunk)
            return [(0, self.first)] + [(s, min(s + self.chunk, latent_frames)) for s in starts]
        if self.short_last:
            raise VpoError(
                f"{latent_frames} latent frames are not whole causal blocks of {self.causal_block} frames; pick "
                f"--frames from {self.valid_frames_hint()}"
            )
        if latent_frames < self.first or (latent_frames - self.first) % self.chunk:
            raise VpoError(
                f"{latent_frames} latent frames are not a whole number of chunks: this model makes {self.first} "
                f"latent frames first, then {self.chunk} at a time; pick --frames from {self.valid_frames_hint()}"
            )
        starts = range(self.first, latent_frames, self.chunk)
        return [(0, self.first)] + [(s, s + self.chunk) for s in starts]

    def valid_frames_hint(self, temporal_factor: int = 4, n: int = 4) -> str:
        step = self.causal_block if self.short_last else self.chunk
        lat = [(self.causal_block if self.short_last else self.first) + k * step for k in range(n)]
        return ", ".join(str((f - 1) * temporal_factor + 1) for f in lat) + ", ..."

    def as_dict(self) -> dict:
        """What manifests record: the asynchronous schedule's fields only when it is on, so that a synchronous
        chunking reads as it did before they existed."""
        d = asdict(self)
        del d["short_last"]
        for k, off in (("ar_step", 0), ("causal_block", 1), ("context_mode", "fresh")):
            if d[k] == off:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Chunking:
        staggered = {k: d[k] for k in ("ar_step", "causal_block", "context_mode") if k in d}
        return cls(**{k: d[k] for k in ("first", "chunk", "context", "context_noise")}, **staggered)


@runtime_checkable
class Backend(Protocol):
    """One model family. vpotool's own sampler (``vpotool.sampling``) runs over these calls."""

    info: ModelInfo
    prediction: str  # "flow" | "epsilon" | "v"
    denoiser: torch.nn.Module  # the module LoRA adapters wrap and trainers optimise
    lora_target_modules: list[str]
    size_multiple: int  # height and width must be multiples of this (VAE factor x patch size)
    defaults: SamplingDefaults
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for ``prompts`` (no grad)."""

    def encode_negative(self, n: int, prompt: str = "") -> Conditioning:
        """The unconditional conditioning for a batch of ``n``, for guidance: the family's own (the empty prompt,
        a learned null caption), or the negative ``prompt`` when one is given."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` of the latent for a video of ``frames`` x ``height`` x ``width`` pixels."""

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        """The sampling grid for ``steps`` denoising steps on latents of ``shape`` ``(C, F, h, w)``
        (families whose shift depends on the token count use it; None means the family's default size)."""

    def training_timesteps(
        self, n: int, generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None
    ) -> NoiseSchedule:
        """``n`` random training timesteps for latents of ``shape``: ``timesteps [n]``, ``alphas [n]``,
        ``sigmas [n]`` (no clean point)."""

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Denoiser output in the backend's ``prediction`` space; ``x_t [B, C, F, h, w]``, ``timesteps [B]``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` to frames ``[B, T, 3, H, W]`` in [0, 1]; differentiable under grad."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` in [0, 1] to latents ``[B, C, F, h, w]`` (deterministic: the mean)."""


def cond_cat(*conds: Conditioning) -> Conditioning:
    """Concatenate conditionings along the batch; keys must match."""
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds]) for k in keys}


def cond_repeat(cond: Conditioning, k: int) -> Conditioning:
    """Repeat each batch entry ``k`` times in place: ``[a, b] -> [a, a, b, b]`` for k = 2."""
    return {key: v.repeat_interleave(k, dim=0) for key, v in cond.items()}


def cond_index(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Select batch entries of a conditioning."""
    return {k: v[index] for k, v in cond.items()}


def tokenize(tokenizer, prompts: list[str], max_len: int, device):
    """Token ids and attention mask ``[B, max_len]`` on ``device``, padded to ``max_len`` as the video pipelines do."""
    tok = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return tok.input_ids.to(device), tok.attention_mask.to(device)


def latent_channels(backend) -> int:
    """Channels of the backend's latents, whatever video length its codec takes."""
    codec = getattr(backend, "codec", None)
    return getattr(codec, "latent_channels", None) or backend.latent_shape(1, 1, 1)[0]


def video_latent_shape(codec, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(C, F, h, w)`` of a codec with ``latent_channels``, ``temporal_factor`` and ``spatial_factor``
    (latent frames ``(T - 1) // factor + 1``, as the causal video VAEs compress)."""
    frames_to_latents = getattr(codec, "latent_frames", None)  # a codec with its own framing (tiny-ar's segments)
    if frames_to_latents:
        f = frames_to_latents(frames)
    else:
        tf = codec.temporal_factor
        if frames < 1 or (frames - 1) % tf:  # the decoder makes (f - 1) * tf + 1 frames: fewer than asked
            below, above = max(1, (frames - 1) // tf * tf + 1), ((max(frames, 1) - 1) // tf + 1) * tf + 1
            raise VpoError(
                f"--frames {frames}: this model's video VAE makes {tf}k + 1 frames (1, {tf + 1}, {2 * tf + 1}, ...); "
                f"pass --frames {below} or {above}"
            )
        f = (frames - 1) // tf + 1
    return (codec.latent_channels, f, height // codec.spatial_factor, width // codec.spatial_factor)


def noise_like(like: torch.Tensor, gens=None) -> torch.Tensor:
    """Standard normal noise shaped like ``like [B, ...]``: row i from ``gens[i]`` (a list of per-video generators,
    reproducible whatever the batch), or the global generator without them."""
    if not gens:
        return torch.randn_like(like)
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like)


def decoded_frames(codec, latent_frames: int) -> int:
    """The video frames ``latent_frames`` latent frames decode to: the inverse of :func:`video_latent_shape`'s."""
    own = getattr(codec, "pixel_frames", None)
    return own(latent_frames) if own else (latent_frames - 1) * codec.temporal_factor + 1


class NegativeCache:
    """The unconditional conditioning, encoded once and expanded to any batch size."""

    def __init__(self, encode):
        self._encode, self._cond = encode, None

    def __call__(self, n: int) -> Conditioning:
        if self._cond is None:
            self._cond = self._encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._cond.items()}


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift of diffusers' flow schedulers: ``sigma' = shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def uniform_sigmas(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training sigmas uniform in (0, 1), kept off the ends (float64)."""
    return torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)


def flow_points(sigmas: torch.Tensor, clean_point: bool) -> NoiseSchedule:
    """Rectified-flow points for ``sigmas`` (alpha = 1 - sigma, model timestep ``sigma * 1000``). With
    ``clean_point`` the last sigma is the grid's clean end and gets no timestep."""
    s = sigmas.float()
    return NoiseSchedule(timesteps=(s[:-1] if clean_point else s) * 1000.0, alphas=1.0 - s, sigmas=s)


def flow_schedule(steps: int, shift: float = 1.0) -> NoiseSchedule:
    """Rectified-flow grid: sigmas from 1 to 0 in ``steps`` steps, :func:`shifted` as diffusers' flow schedulers do."""
    return flow_points(shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift), clean_point=True)


def flow_training_timesteps(n: int, shift: float = 1.0, generator: torch.Generator | None = None) -> NoiseSchedule:
    """``n`` flow-matching training points: sigma uniform in (0, 1), then shifted like the sampling grid."""
    return flow_points(shifted(uniform_sigmas(n, generator), shift), clean_point=False)


def vae_input(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Frames ``[B, T, 3, H, W]`` in [0, 1] as the video VAEs take them: ``[B, 3, T, H, W]`` in [-1, 1]."""
    return (frames.permute(0, 2, 1, 3, 4) * 2 - 1).to(dtype)


def vae_output(video: torch.Tensor) -> torch.Tensor:
    """A video VAE's ``[B, 3, T, H, W]`` output in [-1, 1] as float frames ``[B, T, 3, H, W]`` in [0, 1]."""
    return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def text_length(tokenizer, cap: int) -> int:
    """The prompt length a family encodes at: ``cap``, or the tokenizer's own maximum when that is shorter."""
    return min(cap, getattr(tokenizer, "model_max_length", cap) or cap)


def uses_text_encoder(encode):
    """Decorator for a backend's ``encode_prompts``: no grad, and the text encoder on the backend's device for the
    call when :meth:`TextVideoBackend.offload_text_encoder` moved it to the CPU."""

    @functools.wraps(encode)
    @torch.no_grad()
    def wrapper(self, *args, **kwargs):
        home = next(self.text_encoder.parameters()).device
        if home == self.device:
            return encode(self, *args, **kwargs)
        self.text_encoder.to(self.device)
        try:
            return encode(self, *args, **kwargs)
        finally:
            self.text_encoder.to(home)

    return wrapper


class TextVideoBackend:
    """What the text-to-video families share: a denoiser, a codec (pixels <-> latents, with ``latent_channels``,
    ``temporal_factor`` and ``spatial_factor``), a text encoder and tokenizer, and the unconditional prompt ``""``
    encoded once. Subclasses add ``prediction``, ``encode_prompts``, ``schedule``, ``training_timesteps`` and
    ``predict``, and pass their spatial ``patch_size`` (``size_multiple`` is the codec's factor times it)."""

    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(
        self,
        *,
        info: ModelInfo,
        transformer,
        codec,
        text_encoder,
        tokenizer,
        defaults: SamplingDefaults,
        max_text_len: int,
        patch_size: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.info = info
        self.denoiser = transformer
        self.codec = codec
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.max_text_len = max_text_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.lora_target_modules = list(self.lora_targets)
        self.size_multiple = codec.spatial_factor * patch_size
        self._negative = NegativeCache(self.encode_prompts)
        self._cond_cache: dict[str, Conditioning] = {}
        self._cache_device = self.device

    @property
    def model(self):
        """The denoiser itself, also after a trainer wrapped ``denoiser`` for DDP, FSDP or DeepSpeed: read
        attributes (``config``, learned embeddings) here, and call ``denoiser`` so that the wrapper syncs."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.denoiser)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_negative(self, n: int, prompt: str = "") -> Conditioning:
        return self.encode_prompts([prompt] * n) if prompt else self._negative(n)

    def condition(self, prompts: list[str]) -> Conditioning:
        """:meth:`encode_prompts` with each prompt encoded once per run: trainers see the same prompts every epoch,
        and a large text encoder (UMT5-XXL, T5-XXL) costs a forward per micro-batch otherwise."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            cond = self.encode_prompts(missing)
            for i, p in enumerate(missing):
                self._cond_cache[p] = {k: v[i : i + 1].to(self._cache_device) for k, v in cond.items()}
        return {k: v.to(self.device) for k, v in cond_cat(*(self._cond_cache[p] for p in prompts)).items()}

    def offload_text_encoder(self, prompts: list[str]) -> None:
        """Encode ``prompts`` (and the empty prompt) now, then keep the text encoder and the cached embeddings in
        CPU memory: the accelerator holds neither. A prompt seen later is encoded with the encoder brought back for
        that call (:func:`uses_text_encoder`)."""
        self.condition(list(prompts))
        self._negative(1)
        self.text_encoder.to("cpu")
        self._cache_device = torch.device("cpu")
        self._cond_cache = {p: {k: v.cpu() for k, v in c.items()} for p, c in self._cond_cache.items()}

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return video_latent_shape(self.codec, frames, height, width)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(frames)
