"""The ``self-forcing`` family against Self-Forcing's own causal inference (KV cache, 3-frame blocks, 4 re-noised
steps) on a tiny random generator: ``tests/data/self_forcing_reference.safetensors``, written by
``examples/self_forcing/make_reference.py`` from a Self-Forcing checkout. Also its block causality, its one-line
refusals, and LoRA training on its rollouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import TEXT_LEN, _text_encoder, _wan

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.models.self_forcing import self_forcing_schedule
from vpotool.rollout import rollout

REFERENCE = Path(__file__).parent / "data" / "self_forcing_reference.safetensors"


@pytest.fixture(scope="module")
def reference():
    from safetensors import safe_open

    with safe_open(str(REFERENCE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = f.metadata()
    return tensors, json.loads(meta["config"])


def diffusers_config(cfg: dict) -> dict:
    """``WanTransformer3DModel`` arguments of a ``CausalWanModel`` config (what the Wan folder's config.json says)."""
    return dict(
        patch_size=tuple(cfg["patch_size"]), num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["dim"] // cfg["num_heads"], in_channels=cfg["in_dim"], out_channels=cfg["out_dim"],
        text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"],
        cross_attn_norm=cfg["cross_attn_norm"], qk_norm="rms_norm_across_heads", eps=cfg["eps"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    """A tiny Wan 2.1 diffusers folder (VAE, UMT5, tokenizer; a transformer config of the generator's shape) and
    the generator as Self-Forcing saves it: ``generator`` and ``generator_ema`` with the wrapper's ``model.``
    prefix (the plain generator perturbed, so that a test sees which one loaded)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from vpotool.models.tiny import build_tokenizer

    tensors, cfg = reference
    folder = tmp_path_factory.mktemp("self-forcing")
    tokenizer = build_tokenizer(max_len=TEXT_LEN)
    torch.manual_seed(0)
    _, vae, text_cls, scheduler = _wan()
    assert cfg["text_dim"] == 32 and cfg["text_len"] == TEXT_LEN  # the tiny text encoder's width and length
    transformer = WanTransformer3DModel(**diffusers_config(cfg))
    pipe = WanPipeline(
        transformer=transformer, vae=vae, text_encoder=_text_encoder(text_cls, len(tokenizer)), tokenizer=tokenizer,
        scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder / "wan")
    ema = {"model." + k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
    plain = {k: v + 0.1 for k, v in ema.items()}
    torch.save({"generator": plain, "generator_ema": ema}, folder / "self_forcing.pt")
    return str(folder / "wan"), str(folder / "self_forcing.pt")


@pytest.fixture(scope="module")
def backend(checkpoint):
    path, ckpt = checkpoint
    return load_backend("self-forcing", path, options={"checkpoint": ckpt})


def upstream_rollout(reference, backend, monkeypatch, variant: str = "", steps: int = 4):
    """vpotool's rollout with the family's sampler from the reference's initial noise, replaying the re-noising
    noise Self-Forcing drew in run ``variant`` (its latents ``latents.<variant>``): ``(ours, upstream's)``."""
    import vpotool.models.self_forcing as sf

    tensors, _ = reference
    key = lambda name: f"{name}.{variant}" if variant else name  # noqa: E731
    noise = tensors["noise"].permute(0, 2, 1, 3, 4)  # upstream [B, F, C, h, w] -> vpotool [B, C, F, h, w]
    b = noise.shape[0]
    draws = [z.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4) for z in tensors[key("renoise")]]  # each [B * 3, ...]

    def replay(like, generator):
        z = draws.pop(0)
        assert z.shape == like.shape
        return z

    monkeypatch.setattr(sf, "draw_noise", replay)
    cond = {"encoder_hidden_states": tensors["text"]}
    with torch.no_grad():
        ours = rollout(backend, cond, noise, chunking=backend.chunking, steps=steps,
                       scheduler=backend.pipeline_scheduler).latents  # fmt: skip
    assert not draws  # 3 chunks x (steps - 1) re-noised steps, all used
    ref = tensors[key("latents")].permute(0, 2, 1, 3, 4)
    assert ours.shape == ref.shape == (2, 16, 9, 4, 6)
    assert ref.abs().mean() > 0.1  # not a degenerate reference
    return ours, ref


def test_rollout_equals_self_forcing_causal_inference(reference, backend, monkeypatch):
    """vpotool's rollout with the family's sampler (``--sampler pipeline``) gives the latents of Self-Forcing's
    CausalInferencePipeline from the same initial and re-noising noise: block-causal recomputation of the clean
    history equals its KV cache."""
    ours, ref = upstream_rollout(reference, backend, monkeypatch)
    torch.testing.assert_close(ours, ref, atol=5e-6, rtol=1e-6)  # measured: 1.2e-6 at most, values up to 5


def test_three_steps_equal_self_forcing_with_that_step_list(reference, checkpoint, backend, monkeypatch):
    """``--model-options denoising_steps=1000,600,300`` (warped, as upstream's config) gives upstream's latents with
    ``denoising_step_list: [1000, 600, 300]``; the four-step model's rollout does not."""
    path, ckpt = checkpoint
    three = load_backend("self-forcing", path, options=f"checkpoint={ckpt},denoising_steps=1000,600,300")
    ours, ref = upstream_rollout(reference, three, monkeypatch, "steps3", steps=3)
    torch.testing.assert_close(ours, ref, atol=5e-6, rtol=1e-6)
    four, _ = upstream_rollout(reference, backend, monkeypatch)
    assert (four - ref).abs().max() > 1.0


def test_context_noise_equals_self_forcing_inference_and_training_noises_once(reference, checkpoint, monkeypatch):
    """``context_noise=100``: as upstream's inference fills its KV cache from the clean block at timestep 100, the
    context is labelled, not noised, and the latents equal upstream's (``latents.context100``); noising it instead,
    once per block (``context_mode=training``, the training pipeline's way) or with the labels removed, does not."""
    path, ckpt = checkpoint
    labelled = load_backend("self-forcing", path, options=f"checkpoint={ckpt},context_noise=100")
    assert (labelled.chunking.context_mode, labelled.chunking.context_noise) == ("label", 0.1)
    ours, ref = upstream_rollout(reference, labelled, monkeypatch, "context100")
    torch.testing.assert_close(ours, ref, atol=5e-6, rtol=1e-6)
    once = load_backend("self-forcing", path, options=f"checkpoint={ckpt},context_noise=100,context_mode=training")
    noised, _ = upstream_rollout(reference, once, monkeypatch, "context100")
    assert (noised - ref).abs().max() > 1e-2
    clean, _ = upstream_rollout(reference, load_backend("self-forcing", path, options={"checkpoint": ckpt}),
                                monkeypatch, "context100")  # fmt: skip
    assert (clean - ref).abs().max() > 1e-2  # the label matters
    with pytest.raises(VpoError, match="context_mode=typo: one of inference, training"):
        load_backend("self-forcing", path, options=f"checkpoint={ckpt},context_mode=typo")


def test_schedule_is_the_warped_four_step_grid(backend):
    sched = backend.schedule(4)
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625, 0.0]))
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)
    plain = self_forcing_schedule([1000, 757, 522], 5.0, warp=False)  # the model sees t; sigma: the nearest grid point
    torch.testing.assert_close(plain.timesteps, torch.tensor([1000.0, 757.0, 522.0]))
    torch.testing.assert_close(plain.sigmas, torch.tensor([1.0, 0.757, 0.522, 0.0]), atol=1e-3, rtol=0)
    c = backend.chunking
    assert (c.first, c.chunk, c.context, c.window, c.context_noise) == (3, 3, 18, 21, 0.0)


def test_attention_is_block_causal(backend):
    """A block's output does not depend on later blocks, and does on earlier ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 4, 6, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, TEXT_LEN, 32, generator=g)}
    t = torch.tensor([[0.0] * 3 + [900.0] * 3])
    with torch.no_grad():
        out = backend.predict(x, t, cond)
        later = x.clone()
        later[:, :, 3:] += 1
        earlier = x.clone()
        earlier[:, :, :3] += 1
        torch.testing.assert_close(backend.predict(later, t, cond)[:, :, :3], out[:, :, :3], atol=0, rtol=0)
        assert (backend.predict(earlier, t, cond)[:, :, 3:] - out[:, :, 3:]).abs().max() > 1e-3


def test_refusals_are_one_line(checkpoint, backend, tmp_path):
    path, ckpt = checkpoint
    with pytest.raises(VpoError, match="not a whole number of chunks.*9, 21, 33") as e:
        backend.chunking.spans(8)
    assert "\n" not in str(e.value)
    with pytest.raises(VpoError, match="--steps 8.*4 steps"):
        backend.schedule(8)
    with pytest.raises(VpoError, match="needs its generator checkpoint.*checkpoint=PATH.pt"):
        load_backend("self-forcing", path)
    with pytest.raises(VpoError, match="checkpoint not found"):
        load_backend("self-forcing", path, options={"checkpoint": str(tmp_path / "missing.pt")})
    torch.save({"generator": {"model.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(VpoError, match="no Wan generator in the original layout"):
        load_backend("self-forcing", path, options={"checkpoint": str(tmp_path / "other.pt")})
    state = torch.load(ckpt, weights_only=True)["generator_ema"]
    torch.save({"generator_ema": {k: v for k, v in state.items() if "blocks.1." not in k}}, tmp_path / "cut.pt")
    with pytest.raises(VpoError, match="does not fit the Wan transformer") as e:
        load_backend("self-forcing", path, options={"checkpoint": str(tmp_path / "cut.pt")})
    assert "\n" not in str(e.value)
    with pytest.raises(VpoError, match="denoising_steps=250,500"):
        load_backend("self-forcing", path, options={"checkpoint": ckpt, "denoising_steps": "250,500"})


def test_list_options_from_the_command_line_text_and_from_yaml(checkpoint):
    """``denoising_steps=1000,600,300`` (CausVid-style three steps) reaches the schedule from --model-options text,
    beside other options, and from a YAML list; a list given to a scalar option is one line naming it."""
    from vpotool.models import model_options
    from vpotool.options import parse_pairs

    path, ckpt = checkpoint
    assert parse_pairs("denoising_steps=1000,600,300,shift=5", "--model-options", "") == {
        "denoising_steps": [1000, 600, 300], "shift": 5
    }  # fmt: skip
    text = model_options("self-forcing", f"checkpoint={ckpt},denoising_steps=1000,600,300,warp=false")
    assert text["denoising_steps"] == (1000, 600, 300) and text["warp"] is False
    assert model_options("self-forcing", {"denoising_steps": [1000, 600, 300]}) == {
        "denoising_steps": (1000, 600, 300)
    }
    three = load_backend("self-forcing", path, options=text)
    assert three.schedule(3).timesteps.tolist() == [1000.0, 600.0, 300.0]  # unwarped: the listed timesteps
    with pytest.raises(VpoError, match="shift takes one value, got the list 5,6") as e:
        model_options("self-forcing", "shift=5,6")
    assert "\n" not in str(e.value)
    with pytest.raises(VpoError, match="denoising_steps takes numbers"):
        model_options("self-forcing", "denoising_steps=1000,fast")


def test_the_same_seed_at_more_frames_extends_the_video(backend):
    from families import prefix_chunks_equal

    assert prefix_chunks_equal(backend, 21, 33, 32, 48, steps=4) == 6  # two blocks of 3 latent frames, then a third


def test_ema_choice(checkpoint, backend):
    path, ckpt = checkpoint
    plain = load_backend("self-forcing", path, options={"checkpoint": ckpt, "ema": False})
    ema, other = backend.model.proj_out.bias, plain.model.proj_out.bias
    torch.testing.assert_close(other, ema + 0.1)


def test_scst_on_its_rollouts_trains_a_lora(checkpoint, tmp_path):
    """train-scst on the family's own rollouts (vpotool's flow SDE steps on its 4-step grid) changes the adapter."""
    from vpotool.training.config import ScstConfig
    from vpotool.training.lora import adapter_state
    from vpotool.training.scst import train_scst

    path, ckpt = checkpoint
    b = load_backend("self-forcing", path, options={"checkpoint": ckpt})
    seen = {}

    def on_step(step, trainer):
        seen.update({k: v.clone() for k, v in adapter_state(trainer.denoiser).items()})

    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    size = dict(frames=21, height=16, width=16, steps=4, guidance=1.0)  # 6 latent frames: 2 blocks
    opts = dict(max_steps=1, lr=1e-2, batch_size=2, lora_rank=4, train_fraction=0.25, device="cpu", **size)
    opts["estimator"] = "logp"
    cfg = ScstConfig(prompts=str(prompts), out=str(tmp_path / "o"), reward="brightness", baseline="greedy", **opts)
    train_scst(cfg, backend=b, on_step=on_step)
    lora_b = [v for k, v in seen.items() if "lora_B" in k]  # initialised to zero
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)


def test_sampler_noise_comes_from_each_videos_seed(backend):
    from vpotool.sampling import seeded_noise

    noise = seeded_noise((16, 6, 4, 6), [1, 2], "cpu")
    cond = {"encoder_hidden_states": torch.randn(2, TEXT_LEN, 32, generator=torch.Generator().manual_seed(0))}
    run = lambda seeds: rollout(  # noqa: E731
        backend, cond, noise, chunking=backend.chunking, steps=4, scheduler=backend.pipeline_scheduler,
        step_seeds=seeds,
    ).latents  # fmt: skip
    with torch.no_grad():
        a, b, c = run([5, 6]), run([5, 6]), run([5, 7])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a[0], c[0], atol=0, rtol=0)  # the first video's stream alone decides it
    assert (a[1] - c[1]).abs().max() > 1e-3
