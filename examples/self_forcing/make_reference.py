"""Reference latents of Self-Forcing's own causal inference on a tiny random causal Wan model, for
``tests/test_self_forcing.py`` (which then needs no Self-Forcing checkout).

    pip install --target /tmp/sfdeps einops easydict   # imported by the Self-Forcing code, not by vpotool
    PYTHONPATH=/tmp/sfdeps python examples/self_forcing/make_reference.py --upstream /path/to/Self-Forcing

It builds a seeded tiny ``CausalWanModel`` with the checkout's own code, runs its ``CausalInferencePipeline``
(KV cache, 3 latent frames per block, denoising steps 1000/750/500/250 warped through its flow scheduler with
shift 5, clean-context cache pass at ``context_noise`` 0) on fixed initial noise, records the re-noising noise it
draws, and saves the weights (original Wan layout), text embeddings, noises and output latents to
``tests/data/self_forcing_reference.safetensors``.

What is replaced to run it on a CPU, and why (nothing else of the inference path is touched):
- attention: the checkout calls flash-attn, or scaled-dot-product attention after casting q, k, v to bfloat16
  (flash-attn only takes half precision); here both are float32 scaled-dot-product attention, so the reference is
  the float32 math that vpotool is compared with;
- the KV and cross-attention cache sizes, which the pipeline hard-codes for Wan 1.3B (30 blocks, 12 heads of 128,
  1560 tokens a frame), are the tiny model's;
- ``CausalWanModel.from_pretrained`` (the pipeline's generator loads ``wan_models/``) returns the tiny model;
- the text encoder returns the fixed embeddings and the VAE is skipped (the latents are compared);
- modules that ask for a CUDA device when imported (``demo_utils.memory``, ``wan/modules/t5.py``) see device 0,
  and the ``wan`` package is entered without its ``__init__`` (which imports torchvision for image-to-video).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "self_forcing_reference.safetensors"
# The tiny model: Wan 2.1's architecture at a few thousand parameters; 9 latent frames = 3 blocks of 3.
CONFIG = dict(
    model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=32, ffn_dim=64, freq_dim=64, text_dim=32,
    out_dim=16, num_heads=2, num_layers=2, local_attn_size=-1, sink_size=0, qk_norm=True, cross_attn_norm=True,
    eps=1e-6,
)  # fmt: skip
BATCH, FRAMES, HEIGHT, WIDTH = 2, 9, 4, 6  # latent frames and size
ARGS = dict(
    denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
    independent_first_frame=False, context_noise=0, model_kwargs={"timestep_shift": 5.0},
)  # fmt: skip
# Further runs on the same model, prompts and initial noise, each saved under its name (``latents.steps3``, ...):
# CausVid-style three steps, and a context labelled with timestep 100 (the cache pass at ``context_noise`` 100).
VARIANTS = {"steps3": {"denoising_step_list": [1000, 600, 300]}, "context100": {"context_noise": 100}}
SEED = 0


def float32_attention(q, k, v, *args, **kwargs):
    """``[B, L, H, D]`` attention as the checkout's SDPA fallback computes it, in float32 (no padding mask: the
    inference path passes none)."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def import_upstream(root: Path):
    """The checkout's ``CausalWanModel``, ``WanDiffusionWrapper`` and ``CausalInferencePipeline``."""
    sys.path.insert(0, str(root))
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        for name in ("wan", "wan.modules"):
            package = types.ModuleType(name)
            package.__path__ = [str(root / name.replace(".", "/"))]
            sys.modules[name] = package
        memory = types.ModuleType("demo_utils.memory")
        memory.gpu = torch.device("cpu")
        unused = ("get_cuda_free_memory_gb", "DynamicSwapInstaller", "move_model_to_device_with_memory_preservation")
        for name in unused:  # the low-memory path only
            setattr(memory, name, None)
        sys.modules["demo_utils.memory"] = memory
        import utils.wan_wrapper as wrapper
        import wan.modules.causal_model as causal_model
        import wan.modules.model as model

        spec = importlib.util.spec_from_file_location("causal_inference", root / "pipeline" / "causal_inference.py")
        inference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(inference)
    finally:
        torch.cuda.current_device = current_device
    model.flash_attention = float32_attention  # the cross-attention
    causal_model.attention = float32_attention  # the self-attention over the KV cache
    return causal_model.CausalWanModel, wrapper.WanDiffusionWrapper, inference.CausalInferencePipeline


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights of order one everywhere: upstream's init zeroes the output head and keeps the time and text
    embeddings at std 0.02, which would leave the output (and its dependence on the timestep) near zero."""
    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            continue  # already randn / sqrt(dim)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data = torch.randn(p.shape, generator=gen) / fan_in**0.5
        elif name.endswith("weight"):  # norms
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            p.data = 0.1 * torch.randn(p.shape, generator=gen)


class FixedText(torch.nn.Module):
    """The text encoder's place: the fixed prompt embeddings."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, text_prompts):
        return {"prompt_embeds": self.embeddings}


class NoDecode(torch.nn.Module):
    """The VAE's place: the latents are what is compared."""

    def decode_to_pixel(self, latents, use_cache=False):
        return latents


def tiny_pipeline(CausalInferencePipeline, generator, text: torch.Tensor, tokens_per_frame: int, settings: dict):
    """The checkout's pipeline with its cache sizes set for the tiny model instead of Wan 1.3B's."""
    heads, head_dim = CONFIG["num_heads"], CONFIG["dim"] // CONFIG["num_heads"]

    class TinyCaches(CausalInferencePipeline):
        def _initialize_kv_cache(self, batch_size, dtype, device):
            size = FRAMES * tokens_per_frame
            self.kv_cache1 = [
                {
                    "k": torch.zeros([batch_size, size, heads, head_dim], dtype=dtype, device=device),
                    "v": torch.zeros([batch_size, size, heads, head_dim], dtype=dtype, device=device),
                    "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                    "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
                }
                for _ in range(self.num_transformer_blocks)
            ]

        def _initialize_crossattn_cache(self, batch_size, dtype, device):
            self.crossattn_cache = [
                {"k": None, "v": None, "is_init": False} for _ in range(self.num_transformer_blocks)
            ]

    args = types.SimpleNamespace(**settings)
    pipe = TinyCaches(args, device="cpu", generator=generator, text_encoder=FixedText(text), vae=NoDecode())
    pipe.num_transformer_blocks = CONFIG["num_layers"]
    pipe.frame_seq_length = tokens_per_frame
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, type=Path, help="a Self-Forcing checkout")
    parser.add_argument("--out", type=Path, default=OUT)
    a = parser.parse_args()
    CausalWanModel, WanDiffusionWrapper, CausalInferencePipeline = import_upstream(a.upstream.resolve())

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = CausalWanModel(**CONFIG).eval()
    randomize(model, gen)
    CausalWanModel.from_pretrained = classmethod(lambda cls, *args, **kwargs: model)
    generator = WanDiffusionWrapper(**ARGS["model_kwargs"], is_causal=True)
    text = torch.randn((BATCH, CONFIG["text_len"], CONFIG["text_dim"]), generator=gen)
    text[0, 10:] = 0  # a shorter prompt, zero-padded as the text encoder pads
    noise = torch.randn((BATCH, FRAMES, CONFIG["in_dim"], HEIGHT, WIDTH), generator=gen)
    tokens = (HEIGHT // 2) * (WIDTH // 2)

    def run(settings: dict):
        """The pipeline's latents from ``noise`` and the re-noising noise it drew."""
        pipe = tiny_pipeline(CausalInferencePipeline, generator, text, tokens, settings)
        renoise = []
        randn_like = torch.randn_like

        def recorded(like, **kwargs):  # the pipeline's only random draw: the re-noising between steps
            z = torch.randn(like.shape, generator=gen).to(like)
            renoise.append(z.clone())
            return z

        torch.randn_like = recorded
        try:
            with torch.no_grad():
                _, latents = pipe.inference(noise, ["", ""], return_latents=True)
        finally:
            torch.randn_like = randn_like
        return pipe, latents.contiguous(), torch.stack(renoise)

    pipe, latents, renoise = run(ARGS)
    outputs = {"latents": latents, "renoise": renoise}
    for name, change in VARIANTS.items():
        _, latents_v, renoise_v = run(ARGS | change)
        outputs |= {f"latents.{name}": latents_v, f"renoise.{name}": renoise_v}

    commit = subprocess.run(
        ["git", "-C", str(a.upstream), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    tensors = {f"generator.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {"text": text, "noise": noise, **outputs}
    from safetensors.torch import save_file

    meta = {"config": json.dumps(CONFIG), "args": json.dumps(ARGS), "variants": json.dumps(VARIANTS)}
    meta["upstream_commit"] = commit
    meta["timesteps"] = json.dumps([float(t) for t in pipe.denoising_step_list])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out), metadata=meta)
    size = a.out.stat().st_size
    print(f"wrote {a.out} ({size / 1e3:.0f} kB): latents {tuple(latents.shape)}, {len(renoise)} re-noise draws, "
          f"variants {', '.join(VARIANTS)}")  # fmt: skip


if __name__ == "__main__":
    main()
