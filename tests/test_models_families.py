"""The diffusers family backends (Wan, CogVideoX, LTX) on tiny random checkpoints: the protocol, the schedules
against diffusers' schedulers, and sampling against the diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILY_SIZES, make_tiny_checkpoint

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.sampling import ddim_step, sample, seeded_noise, split_prediction

FAMILIES = ["wan", "cogvideox", "ltx"]
PROMPTS = ["a red circle moving left", "a blue square on a black background"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's tiny checkpoint, built once per module on first use."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def backend(checkpoints, family):
    return load_backend(family, checkpoints(family))


def _noise(backend, family, seeds=(1, 2)):
    return seeded_noise(backend.latent_shape(*FAMILY_SIZES[family]), seeds, backend.device)


def test_latent_shape_matches_codec(backend, family):
    frames, height, width = FAMILY_SIZES[family]
    c = backend.codec
    expected = (
        c.latent_channels,
        (frames - 1) // c.temporal_factor + 1,
        height // c.spatial_factor,
        width // c.spatial_factor,
    )
    assert backend.latent_shape(frames, height, width) == expected
    video = torch.rand(1, frames, 3, height, width)
    with torch.no_grad():
        assert tuple(backend.encode(video).shape[1:]) == expected


def test_encode_prompts_is_batch_first(backend):
    cond = backend.encode_prompts(PROMPTS)
    uncond = backend.encode_negative(3)
    assert cond.keys() == uncond.keys()
    for key, value in cond.items():
        assert value.shape[0] == len(PROMPTS)
        assert uncond[key].shape == (3, *value.shape[1:])
        assert torch.isfinite(value.float()).all()


def test_sample_shape_finite_and_deterministic(checkpoints, family):
    def run():
        backend = load_backend(family, checkpoints(family))
        noise = _noise(backend, family)
        cond = backend.encode_prompts(PROMPTS)
        return sample(backend, cond, noise, steps=2, guidance=2.0, uncond=backend.encode_negative(2)).latents, noise

    first, noise = run()
    second, _ = run()
    assert first.shape == noise.shape
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_decode_and_encode_shapes(backend, family):
    frames, height, width = FAMILY_SIZES[family]
    z = _noise(backend, family)
    with torch.no_grad():
        video = backend.decode(z)
        assert video.shape == (2, frames, 3, height, width)
        assert (z.shape[2] - 1) * backend.codec.temporal_factor + 1 == frames
        assert video.min() >= 0 and video.max() <= 1
        assert backend.encode(video).shape == z.shape


def test_decode_is_differentiable(backend, family):
    z = _noise(backend, family, seeds=(3,)).requires_grad_()
    backend.decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_stochastic_sample_logps(backend, family):
    noise = _noise(backend, family)
    cond = backend.encode_prompts(PROMPTS)
    kwargs = dict(steps=2, guidance=2.0, uncond=backend.encode_negative(2), noise_level=0.7, step_seeds=[5, 6])
    traj = sample(backend, cond, noise, **kwargs)
    assert traj.logps.shape == (2, 2)
    assert torch.isfinite(traj.logps).all() and torch.isfinite(traj.latents).all()
    assert torch.equal(sample(backend, cond, noise, **kwargs).latents, traj.latents)


def test_schedule_convention_and_clean_end(backend, family):
    shape = backend.latent_shape(*FAMILY_SIZES[family])  # LTX shifts its schedule by the latent's token count
    for sched in (backend.schedule(4, shape), backend.training_timesteps(16, torch.Generator().manual_seed(0), shape)):
        a, s = sched.alphas.double(), sched.sigmas.double()
        if backend.prediction == "flow":
            assert torch.allclose(a, 1 - s, atol=1e-6)
        else:
            assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-5)
        assert ((s >= 0) & (s <= 1)).all()
    sched = backend.schedule(4, shape)
    assert len(sched) == 4 and sched.alphas.shape == sched.sigmas.shape == (5,)
    assert (sched.timesteps[1:] < sched.timesteps[:-1]).all()
    assert sched.alphas[-1] == 1 and sched.sigmas[-1] == 0


def test_lora_targets_name_denoiser_modules(backend):
    from peft import LoraConfig

    names = [name for name, _ in backend.denoiser.named_modules()]
    for target in backend.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    backend.denoiser.add_adapter(LoraConfig(r=2, target_modules=backend.lora_target_modules))
    assert any("lora_A" in n for n, _ in backend.denoiser.named_parameters())


def test_missing_folders_raise_one_line_errors(tmp_path, family):
    with pytest.raises(VpoError) as missing:
        load_backend(family, str(tmp_path / "nowhere"))
    (tmp_path / "partial" / "vae").mkdir(parents=True)
    with pytest.raises(VpoError) as partial:
        load_backend(family, str(tmp_path / "partial"))
    assert "transformer/" in str(partial.value)
    for err in (missing, partial):
        assert "\n" not in str(err.value)


# CogVideoX: the schedule is the checkpoint's CogVideoXDDIMScheduler, and sampling matches its pipeline.


def _cog(checkpoints):
    return load_backend("cogvideox", checkpoints("cogvideox"))


def test_cogvideox_schedule_matches_scheduler(checkpoints):
    from diffusers import CogVideoXDDIMScheduler

    backend = _cog(checkpoints)
    ref = CogVideoXDDIMScheduler.from_pretrained(checkpoints("cogvideox"), subfolder="scheduler")
    assert ref.config.snr_shift_scale == 1.0  # the checkpoint's value, not the 2b fallback
    sched = backend.schedule(50)
    ref.set_timesteps(50)
    assert torch.equal(sched.timesteps, ref.timesteps.float())
    assert torch.equal(sched.timesteps, torch.arange(999, 0, -20).float())  # "trailing": 999, 979, ..., 19
    abar = ref.alphas_cumprod[ref.timesteps].double()
    assert torch.allclose(sched.alphas[:-1].double() ** 2, abar, atol=1e-6)
    assert torch.allclose(sched.sigmas[:-1].double() ** 2, 1 - abar, atol=1e-6)
    assert sched.alphas[0] == 0  # zero terminal SNR: the first step is pure noise

    # One deterministic DDIM step on a v-prediction equals the scheduler's step.
    x, v = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    for i in (0, 10, 49):
        a, s, a1, s1 = sched.alphas[i], sched.sigmas[i], sched.alphas[i + 1], sched.sigmas[i + 1]
        x0, eps = split_prediction(v, x, a, s, "v")
        ours = ddim_step(x0, eps, a, s, a1, s1, eta=0.0)[0]
        theirs = ref.step(v, int(ref.timesteps[i]), x).prev_sample
        assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_cogvideox_training_timesteps_are_integers(checkpoints):
    backend = _cog(checkpoints)
    t = backend.training_timesteps(256, torch.Generator().manual_seed(0))
    assert torch.equal(t.timesteps, t.timesteps.round())
    assert t.timesteps.min() >= 0 and t.timesteps.max() <= 999
    assert torch.allclose(t.alphas.double() ** 2, backend.alphas_cumprod[t.timesteps.long()], atol=1e-6)


def test_cogvideox_sampling_matches_pipeline(checkpoints):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    backend = _cog(checkpoints)
    frames, height, width = FAMILY_SIZES["cogvideox"]
    noise = _noise(backend, "cogvideox")
    cond, uncond = backend.encode_prompts(PROMPTS), backend.encode_negative(2)
    ours = sample(backend, cond, noise, steps=4, guidance=2.0, uncond=uncond).latents

    scheduler = CogVideoXDDIMScheduler.from_pretrained(checkpoints("cogvideox"), subfolder="scheduler")
    pipe = CogVideoXPipeline(backend.tokenizer, backend.text_encoder, backend.codec.vae, backend.denoiser, scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=4,
        guidance_scale=2.0,
        latents=noise.permute(0, 2, 1, 3, 4),
        output_type="latent",
        return_dict=False,
    )[0]
    assert torch.allclose(ours, theirs.permute(0, 2, 1, 3, 4).float(), atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        dict(sample_width=2, sample_height=2),  # CogVideoX-2b: sincos positions, no rotary
        dict(sample_width=2, sample_height=2, use_rotary_positional_embeddings=True),  # CogVideoX-5b
        dict(sample_width=8, sample_height=8, use_rotary_positional_embeddings=True, patch_size_t=2),  # 1.5
        dict(sample_width=8, sample_height=8, use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=2),
    ],
)
def test_cogvideox_transformer_variants(checkpoints, variant):
    """Every published transformer layout predicts on a non-square latent with an odd frame count, with the
    pipeline's rotary embeddings (1.5 pads the frames to its temporal patch inside ``predict``)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from vpotool.models.cogvideox import CogVideoXBackend

    loaded = _cog(checkpoints)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=16,
        **variant,
    ).eval()
    parts = dict(codec=loaded.codec, text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer)
    backend = CogVideoXBackend(info=loaded.info, transformer=transformer, scheduler=loaded.scheduler, **parts)
    x = torch.randn(2, 4, 3, 4, 6)
    with torch.no_grad():
        out = backend.predict(x, torch.tensor([999.0, 500.0]), backend.encode_prompts(PROMPTS))
    assert out.shape == x.shape and torch.isfinite(out).all()
    if transformer.config.use_rotary_positional_embeddings:
        frames = 4 if transformer.config.patch_size_t else 3
        pipe = CogVideoXPipeline(
            backend.tokenizer, backend.text_encoder, backend.codec.vae, transformer, loaded.scheduler
        )
        expected = pipe._prepare_rotary_positional_embeddings(32, 48, frames, torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(backend._rotary(frames, 4, 6), expected, strict=True))


# LTX: pure schedule functions against FlowMatchEulerDiscreteScheduler, packing and sampling against LTXPipeline.


def test_ltx_sigmas_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift as ref_shift

    from vpotool.models.ltx import LTX_SCHEDULER, calculate_shift, ltx_sigmas

    ref = FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER)
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    for seq_len in (48, 1024, 7392):
        mu = calculate_shift(seq_len, *(LTX_SCHEDULER[k] for k in keys))
        assert mu == pytest.approx(ref_shift(seq_len, *(LTX_SCHEDULER[k] for k in keys)))
        for steps in (2, 10, 50):
            ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            ours = ltx_sigmas(steps, mu, shift_terminal=LTX_SCHEDULER["shift_terminal"])
            assert torch.allclose(ours.float(), ref.sigmas, atol=1e-6)
            assert ours[-2] == pytest.approx(LTX_SCHEDULER["shift_terminal"])


def test_ltx_schedule_follows_the_latent_shape(checkpoints):
    backend = load_backend("ltx", checkpoints("ltx"))
    small_shape = backend.latent_shape(9, 16, 16)
    assert small_shape == (8, 3, 4, 4)
    small = backend.schedule(4, small_shape)
    large = backend.schedule(4, backend.latent_shape(9, 64, 64))
    trained = backend.training_timesteps(64, torch.Generator().manual_seed(0), small_shape)
    assert torch.allclose(trained.alphas, 1 - trained.sigmas)
    assert (large.sigmas[1:-2] > small.sigmas[1:-2]).all()  # more tokens, more shift towards noise
    assert large.sigmas[-2] == small.sigmas[-2] == pytest.approx(0.1)  # both stretched to shift_terminal
    assert torch.allclose(large.timesteps, large.sigmas[:-1] * 1000)


def test_ltx_packing_and_normalisation_match_pipeline(checkpoints):
    from diffusers import LTXPipeline

    from vpotool.models.ltx import pack_latents, unpack_latents

    z = torch.randn(2, 8, 4, 6, 4)
    for p, pt in ((1, 1), (2, 2)):
        packed = pack_latents(z, p, pt)
        assert torch.equal(packed, LTXPipeline._pack_latents(z, p, pt))
        assert torch.equal(unpack_latents(packed, 4 // pt, 6 // p, 4 // p, p, pt), z)

    backend = load_backend("ltx", checkpoints("ltx"))
    vae = backend.codec.vae
    vae.latents_mean.copy_(torch.randn(8))
    vae.latents_std.copy_(torch.rand(8) + 0.5)
    latents = _noise(backend, "ltx")
    with torch.no_grad():
        raw = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        expected = vae.decode(raw, torch.zeros(2), return_dict=False)[0]
        assert torch.allclose(backend.decode(latents), ((expected + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))
        video = torch.rand(1, 9, 3, 16, 16)
        z = vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
        norm = LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        assert torch.allclose(backend.encode(video), norm, atol=1e-6)


def test_ltx_sampling_matches_pipeline(checkpoints):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    from vpotool.models.ltx import pack_latents, unpack_latents

    backend = load_backend("ltx", checkpoints("ltx"))
    frames, height, width = 9, 32, 32  # the pipeline wants sizes divisible by 32
    noise = seeded_noise(backend.latent_shape(frames, height, width), [1, 2], "cpu")
    cond, uncond = backend.encode_prompts(PROMPTS), backend.encode_negative(2)
    ours = sample(backend, cond, noise, steps=3, guidance=2.0, uncond=uncond).latents

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoints("ltx"), subfolder="scheduler")
    pipe = LTXPipeline(scheduler, backend.codec.vae, backend.text_encoder, backend.tokenizer, backend.denoiser)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        prompt_attention_mask=cond["encoder_attention_mask"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_prompt_attention_mask=uncond["encoder_attention_mask"],
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.0,
        latents=pack_latents(noise),
        output_type="latent",
        return_dict=False,
    )[0]
    assert torch.allclose(ours, unpack_latents(theirs.float(), *noise.shape[2:]), atol=1e-5)


def test_wan_with_an_euler_scheduler_samples_what_wan_pipeline_samples(tmp_path):
    """A Wan folder whose scheduler is ``FlowMatchEulerDiscreteScheduler``: ``vpotool sample`` steps on that
    scheduler's sigma grid, so its latents equal ``WanPipeline``'s for the same noise, guidance and prompts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from families import TEXT_LEN

    from vpotool.config import SampleConfig
    from vpotool.latents import load_latents
    from vpotool.manifest import read_manifest, resolve
    from vpotool.stages.sample import run_sample

    folder = make_tiny_checkpoint("wan", tmp_path / "wan")
    pipe = WanPipeline.from_pretrained(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.save_pretrained(folder)  # model_index.json names the new scheduler too
    (tmp_path / "p.txt").write_text("a red circle moving left\na blue square\n")
    frames, height, width = FAMILY_SIZES["wan"]
    size = dict(frames=frames, height=height, width=width, steps=4, guidance=4.0, device="cpu")
    cfg = SampleConfig(prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "run"), model="wan", model_path=folder,
                       candidates=1, **size)  # fmt: skip
    manifest = run_sample(cfg)
    pipe = WanPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for row in read_manifest(manifest, "samples").to_pylist():
        ours = load_latents([resolve(manifest, row["latent"])])[0]
        theirs = pipe(
            prompt=row["prompt"], negative_prompt="", num_frames=frames, height=height, width=width,
            num_inference_steps=4, guidance_scale=4.0, max_sequence_length=TEXT_LEN, output_type="latent",
            generator=torch.Generator().manual_seed(row["seed"]),
        ).frames[0]  # fmt: skip
        assert ours.abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("sampler", "negative"), [("pipeline", ""), ("pipeline", "blurry, static"), ("euler", "")])
def test_wan_sample_with_its_unipc_scheduler_equals_wan_pipeline(sampler, negative, checkpoints, tmp_path):
    """``sample --sampler pipeline`` (the default) steps Wan's saved UniPC multistep scheduler and equals
    ``WanPipeline`` (guidance, the empty or a given negative prompt included); ``--sampler euler`` is vpotool's
    own first-order grid, a different solver, and differs."""
    from diffusers import WanPipeline
    from families import TEXT_LEN

    from vpotool.config import SampleConfig
    from vpotool.latents import load_latents
    from vpotool.manifest import read_manifest, resolve
    from vpotool.stages.sample import run_sample

    folder = checkpoints("wan")
    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    frames, height, width = FAMILY_SIZES["wan"]
    size = dict(frames=frames, height=height, width=width, steps=6, guidance=4.0, device="cpu")
    cfg = SampleConfig(prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "run"), model="wan", model_path=folder,
                       candidates=1, sampler=sampler, negative_prompt=negative, **size)  # fmt: skip
    manifest = run_sample(cfg)
    row = read_manifest(manifest, "samples").to_pylist()[0]
    ours = load_latents([resolve(manifest, row["latent"])])[0]
    pipe = WanPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    theirs = pipe(
        prompt=row["prompt"], negative_prompt=negative or None, num_frames=frames, height=height, width=width,
        num_inference_steps=6,
        guidance_scale=4.0, max_sequence_length=TEXT_LEN, output_type="latent",
        generator=torch.Generator().manual_seed(row["seed"]),
    ).frames[0]  # fmt: skip
    if sampler == "pipeline":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    else:
        assert (ours - theirs).abs().max() > 1e-3


def test_wan_cleans_prompts_as_wan_pipeline(checkpoints):
    """WanPipeline cleans each prompt (ftfy when installed, HTML entities unescaped twice, whitespace collapsed)
    before tokenizing; vpotool's Wan families encode the same text."""
    from diffusers import WanPipeline
    from families import TEXT_LEN

    from vpotool.models import load_backend

    folder = checkpoints("wan")
    backend = load_backend("wan", folder, "cpu")
    pipe = WanPipeline.from_pretrained(folder)
    prompts = ["a red&amp;amp;blue  circle&nbsp;moving\tleft ", "a blue square"]
    ours = backend.encode_prompts(prompts)["encoder_hidden_states"]
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    raw = backend.encode_prompts(["a red&amp;amp;blue  circle&nbsp;moving\tleft "])["encoder_hidden_states"]
    torch.testing.assert_close(ours[:, : theirs.shape[1]], theirs, atol=1e-5, rtol=1e-4)
    assert torch.equal(raw[0], ours[0])
