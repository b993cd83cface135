"""Open-Sora 1.2 backend (``--model opensora``): STDiT3 denoiser, OpenSora-VAE-v1.2, T5-XXL text encoder, all in
vpotool's own code (``stdit3.py``, ``vae.py``) with the published parameter names.

Sign conventions. Open-Sora's rectified flow adds noise as ``x_t = tau * x0 + (1 - tau) * noise`` with
``tau = 1 - t / 1000`` and trains the model to predict ``x0 - noise`` at timestep ``t``. In vpotool's convention
(``x_t = (1 - sigma) * x0 + sigma * noise``, velocity ``noise - x0``) that is ``sigma = 1 - tau = t / 1000``, the model
timestep is ``1000 * sigma`` as in diffusers, and ``predict`` returns ``-(model output)``: vpotool's velocity.
Open-Sora's ``timestep_transform`` is the usual flow shift ``sigma' = r sigma / (1 + (r - 1) sigma)`` with
``r = sqrt(H * W / 512**2) * sqrt(frames // 17 * 5)`` (pixels; frames // 17 * 5 equals ``F // 5 * 5`` in latent
frames), so the sampling grid is :func:`~vpotool.models.base.flow_schedule` with that shift.

Folder layout for ``--model-path DIR``: ``DIR/transformer`` (hpcai-tech/OpenSora-STDiT-v3), ``DIR/vae``
(hpcai-tech/OpenSora-VAE-v1.2), ``DIR/text_encoder`` (DeepFloyd/t5-v1_1-xxl) and optionally ``DIR/tokenizer`` (else
the tokenizer is read from ``DIR/text_encoder``).
"""

from __future__ import annotations

import math
import os

import torch

from vpotool.errors import VpoError, first_line
from vpotool.models.base import (
    Conditioning,
    ModelInfo,
    NoiseSchedule,
    SamplingDefaults,
    TextVideoBackend,
    flow_points,
    flow_schedule,
    shifted,
    tokenize,
    uses_text_encoder,
    vae_input,
    vae_output,
)

OPENSORA_DEFAULTS = SamplingDefaults(frames=51, height=240, width=432, fps=24, steps=30, guidance=7.0)
HUB_IDS = {
    "transformer": "hpcai-tech/OpenSora-STDiT-v3",
    "vae": "hpcai-tech/OpenSora-VAE-v1.2",
    "text_encoder": "DeepFloyd/t5-v1_1-xxl",
}

# Open-Sora 1.2's ASPECT_RATIOS (opensora/datasets/aspect.py): (height, width) in pixels by resolution and
# height:width ratio. vpotool needs multiples of 16; :func:`preset_size` rounds them.
ASPECT_RATIOS = {
    "240p": {"9:16": (240, 426), "3:4": (276, 368), "1:1": (320, 320), "4:3": (370, 278), "16:9": (426, 240)},
    "360p": {"9:16": (360, 640), "3:4": (416, 554), "1:1": (480, 480), "4:3": (554, 416), "16:9": (640, 360)},
    "480p": {"9:16": (480, 854), "3:4": (554, 738), "1:1": (640, 640), "4:3": (740, 555), "16:9": (854, 480)},
    "720p": {"9:16": (720, 1280), "3:4": (832, 1110), "1:1": (960, 960), "4:3": (1108, 832), "16:9": (1280, 720)},
}
NUM_FRAMES = {"2s": 51, "4s": 102, "8s": 204, "16s": 408}  # Open-Sora 1.2's duration presets at 24 fps


def preset_size(resolution: str, aspect_ratio: str, multiple: int = 16) -> tuple[int, int]:
    """``(height, width)`` for an Open-Sora preset, each rounded to the nearest ``multiple`` (pass them as
    ``--height``/``--width``). ``aspect_ratio`` is height:width as Open-Sora writes it ("9:16" is 240x426 at 240p)."""
    if resolution not in ASPECT_RATIOS or aspect_ratio not in ASPECT_RATIOS[resolution]:
        raise VpoError(
            f"unknown Open-Sora preset {resolution} {aspect_ratio}; resolutions: {', '.join(ASPECT_RATIOS)}, "
            f"ratios: {', '.join(ASPECT_RATIOS['240p'])}"
        )
    h, w = ASPECT_RATIOS[resolution][aspect_ratio]
    return max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)


def opensora_shift(shape: tuple[int, ...], spatial_factor: int = 8, time_chunk: int = 5) -> float:
    """Open-Sora 1.2's ``timestep_transform`` ratio for latents ``(C, F, h, w)``: ``sqrt(H W / 512^2)`` times
    ``sqrt(F // 5 * 5)`` (1 for a single frame; at least 1 where upstream's formula would give 0)."""
    _, f, h, w = shape
    space = math.sqrt(h * spatial_factor * w * spatial_factor / 512**2)
    frames = 1 if f == 1 else max(f // time_chunk * time_chunk, 1)
    return space * math.sqrt(frames)


class OpenSoraCodec:
    """OpenSora-VAE-v1.2 between [0, 1] frames and its scaled latents, in chunks of 17 frames (``latent_frames``)."""

    spatial_factor = 8

    def __init__(self, vae, dtype: torch.dtype):
        self.vae, self.dtype = vae, dtype
        self.latent_channels = vae.cfg.channels

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(vae_input(frames, self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_output(self.vae.decode(latents.to(self.dtype)))


IMAGE_FPS = 120.0  # the fps upstream conditions single images (--frames 1) on, IMG_FPS in opensora/datasets


class OpenSoraBackend(TextVideoBackend):
    """Open-Sora 1.2 behind vpotool's Backend protocol; ``prediction`` is ``"flow"`` in vpotool's sign."""

    prediction = "flow"
    lora_targets = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")

    def __init__(
        self, *, transformer, vae, defaults: SamplingDefaults = OPENSORA_DEFAULTS, dtype=torch.float32,
        aesthetic_score: float | None = 6.5, clean_prompts: bool = True, **parts,
    ):  # fmt: skip
        """``vae``: an ``OpenSoraVAE``; ``aesthetic_score``, ``clean_prompts``: see :meth:`prompt_text` (upstream
        v1.2's defaults); ``parts``: the other :class:`TextVideoBackend` arguments."""
        self.aesthetic_score = aesthetic_score
        self.clean_prompts = clean_prompts
        cfg = transformer.cfg
        super().__init__(
            transformer=transformer,
            codec=OpenSoraCodec(vae, dtype),
            defaults=defaults,
            max_text_len=cfg.model_max_length,
            patch_size=cfg.patch_size[1],
            dtype=dtype,
            **parts,
        )
        self.fps: float | None = None  # the fps the denoiser is conditioned on; see use_video
        self.spatial_factor = self.codec.spatial_factor

    def use_video(self, frames: int, fps: float) -> None:
        """Condition the denoiser as upstream's inference does for ``frames`` pixel frames written at ``fps`` (the
        resolved ``--frames`` and ``--fps``): on ``fps``, or on ``IMAGE_FPS`` for a single frame (an image; 2 to 4
        frames are one latent frame but a video). Until called, one latent frame is taken for an image and more
        for a video at the model's default fps."""
        self.fps = IMAGE_FPS if frames == 1 else float(fps)

    def condition_fps(self, latent_frames: int) -> float:
        """The fps the denoiser is conditioned on for ``latent_frames`` latent frames (see :meth:`use_video`)."""
        if self.fps is not None:
            return self.fps
        return IMAGE_FPS if latent_frames == 1 else float(self.defaults.fps)

    def size_preset(self, name: str) -> tuple[int, int]:
        """``--size`` for Open-Sora: ``240p`` (its default 9:16) or ``RES:H:W``, e.g. ``480p:16:9``."""
        resolution, _, ratio = name.partition(":")
        return preset_size(resolution, ratio or "9:16", self.size_multiple)

    def prompt_text(self, prompt: str, suffix: bool = True) -> str:
        """What upstream's inference hands T5 for ``prompt``: `` aesthetic score: 6.5.`` appended (unless the prompt
        already names one, or ``aesthetic_score`` is None), then the caption cleaning its training used (DeepFloyd
        IF's cleaner, twice), or only lower-casing with ``clean_prompts`` off."""
        if suffix and self.aesthetic_score is not None and "aesthetic score:" not in prompt:
            prompt = f"{prompt} aesthetic score: {self.aesthetic_score:.1f}."
        return clean_caption(clean_caption(prompt)) if self.clean_prompts else prompt.lower().strip()

    @uses_text_encoder
    def encode_prompts(self, prompts: list[str], suffix: bool = True) -> Conditioning:
        """``y [B, 300, 4096]`` T5 states and ``mask [B, 300]`` (1 for real tokens) of :meth:`prompt_text`, as
        Open-Sora's T5 encoder."""
        texts = [self.prompt_text(p, suffix) for p in prompts]
        ids, mask = tokenize(self.tokenizer, texts, self.max_text_len, self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return {"y": hidden.to(self.dtype), "mask": mask}

    def encode_negative(self, n: int, prompt: str = "") -> Conditioning:
        """The learned null caption ``y_embedding``, every token attended and marked ``null [B]``: under guidance
        :meth:`unconditional_for` gives it the prompt's mask, as upstream does. A negative ``prompt`` is encoded
        as a prompt with its own mask (upstream since v1.3, the first with negative prompts), cleaned like one,
        without the aesthetic-score suffix."""
        if prompt:
            return self.encode_prompts([prompt] * n, suffix=False)
        y = self.model.null_caption(n).to(self.dtype)
        ones = torch.ones(y.shape[:2], dtype=torch.long, device=y.device)
        return {"y": y, "mask": ones, "null": torch.ones(n, dtype=torch.bool, device=y.device)}

    def unconditional_for(self, uncond: Conditioning, cond: Conditioning) -> Conditioning:
        """The unconditional input of a guided step on ``cond``; the sampler calls this before each one. Upstream
        Open-Sora attends the null caption (rows marked ``null``) through the prompt's own token mask, so the null
        branch of each guided pair sees as many tokens as its prompt; a negative prompt keeps its own mask."""
        null = uncond.get("null")
        if null is None:
            return {"y": uncond["y"], "mask": uncond["mask"]}
        return {"y": uncond["y"], "mask": torch.where(null[:, None], cond["mask"], uncond["mask"])}

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        c = self.codec.vae.cfg
        return (c.channels, c.latent_frames(frames), height // self.spatial_factor, width // self.spatial_factor)

    def _shape(self, shape):
        d = self.defaults
        return shape if shape is not None else self.latent_shape(d.frames, d.height, d.width)

    def schedule(self, steps: int, shape: tuple[int, ...] | None = None) -> NoiseSchedule:
        return flow_schedule(steps, opensora_shift(self._shape(shape)))

    def training_timesteps(
        self, n: int, generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None
    ) -> NoiseSchedule:
        """Logit-normal sigmas (Open-Sora 1.2's training ``sample_method``), then the resolution/frame shift."""
        shift = opensora_shift(self._shape(shape))
        u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64)).clamp(1e-3, 1 - 1e-3)
        return flow_points(shifted(u, shift), clean_point=False)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """vpotool's velocity ``noise - x0`` ``[B, C, F, h, w]``: minus the first ``C`` channels of STDiT3's output."""
        b, c, _, h, w = x_t.shape
        out = self.denoiser(
            x_t.to(self.dtype),
            timesteps.to(self.device).float().expand(b),
            cond["y"],
            mask=cond["mask"],
            fps=torch.full((b,), self.condition_fps(x_t.shape[2]), device=self.device),
            height=h * self.spatial_factor,
            width=w * self.spatial_factor,
        )
        return -out[:, :c]


def clean_caption(text: str) -> str:
    """One pass of the caption cleaner Open-Sora 1.2 (after PixArt and DeepFloyd IF) applies to T5 prompts: URLs,
    HTML, @names, CJK and stray punctuation removed, lower-cased. Diffusers' copy of the cleaner (``IFPipeline``)
    does it; it needs beautifulsoup4 and ftfy."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    if not (is_bs4_available() and is_ftfy_available()):
        raise VpoError(
            "Open-Sora's prompt cleaning needs beautifulsoup4 and ftfy: pip install beautifulsoup4 ftfy "
            "(or pass --model-options clean_prompts=false)"
        )
    from diffusers import IFPipeline

    return IFPipeline._clean_caption(IFPipeline, text)  # uses only class attributes of the pipeline


def missing_weights_message(path) -> str:
    return (
        f"no Open-Sora 1.2 weights at {path}: download {HUB_IDS['transformer']} into DIR/transformer, "
        f"{HUB_IDS['vae']} into DIR/vae and {HUB_IDS['text_encoder']} into DIR/text_encoder "
        "(e.g. huggingface-cli download ID --local-dir DIR/transformer), then pass --model-path DIR"
    )


def load_opensora(path, device="cpu", dtype=torch.float32, **options) -> OpenSoraBackend:
    """Open-Sora 1.2 from a local folder laid out as ``transformer/``, ``vae/``, ``text_encoder/`` [``tokenizer/``];
    ``options``: ``aesthetic_score``, ``clean_prompts`` (see :meth:`OpenSoraBackend.prompt_text`)."""
    from vpotool.models.opensora.stdit3 import STDiT3
    from vpotool.models.opensora.vae import OpenSoraVAE

    if not path or not os.path.isdir(path):
        raise VpoError(missing_weights_message(path))
    sub = {name: os.path.join(path, name) for name in ("transformer", "vae", "text_encoder", "tokenizer")}
    absent = [name for name in ("transformer", "vae", "text_encoder") if not os.path.isdir(sub[name])]
    if absent:
        raise VpoError(f"{path} has no {', '.join(n + '/' for n in absent)}; " + missing_weights_message(path))
    try:
        transformer = STDiT3.from_pretrained(sub["transformer"], dtype=dtype)
        vae = OpenSoraVAE.from_pretrained(sub["vae"], dtype=dtype)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        first = first_line(e)
        raise VpoError(f"could not load Open-Sora weights from {path}: {first}") from e
    from transformers import AutoTokenizer, T5EncoderModel

    from vpotool.models.loading import load_component, weightless

    text_encoder = load_component(T5EncoderModel, sub["text_encoder"], None, "opensora", dtype=dtype)
    tok_dir = sub["tokenizer"] if os.path.isdir(sub["tokenizer"]) else sub["text_encoder"]
    tokenizer = load_component(AutoTokenizer, tok_dir, None, "opensora")
    ids = [] if weightless() else tokenizer("a cat", add_special_tokens=False).input_ids  # a plan tokenizes nothing
    probe = tokenizer.convert_ids_to_tokens(ids) if ids else ["a"]
    if not [t for t in probe if t not in (getattr(tokenizer, "unk_token", None), "\u2581")]:  # only <unk>, word starts
        raise VpoError(
            f"the tokenizer read from {tok_dir} maps every word to {tokenizer.unk_token} (no tokenizer files there?); "
            f"put {HUB_IDS['text_encoder']}'s tokenizer files (spiece.model, tokenizer_config.json) in "
            f"{path}/tokenizer"
        )
    return OpenSoraBackend(
        info=ModelInfo(name="opensora", path=str(path)),
        transformer=transformer.to(device),
        vae=vae.to(device),
        text_encoder=text_encoder.to(device),
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        **options,
    )
