"""The built-in tiny model is a diffusers Wan pipeline folder: diffusers loads it, and ``vpotool sample`` gives the
latents ``WanPipeline`` gives with the same scheduler, noise, guidance and prompts."""

from __future__ import annotations

import pytest
import torch

from vpotool.config import SampleConfig
from vpotool.latents import load_latents
from vpotool.manifest import read_manifest, resolve
from vpotool.models.tiny import ASSET_DIR, TINY_TEXT_LEN, build_tiny_pipeline
from vpotool.stages.sample import run_sample

PROMPTS = [
    "a red circle moving left slowly on a black background",
    "a blue square moving up quickly on a gray background",
]


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(seed=3).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("which", ["random", "shipped"])
def test_sample_equals_wan_pipeline(which, random_tiny, tmp_path):
    from diffusers import WanPipeline

    folder = random_tiny if which == "random" else str(ASSET_DIR)
    if which == "shipped" and not (ASSET_DIR / "model_index.json").is_file():
        pytest.skip("no shipped weights")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    settings = dict(frames=9, height=32, width=32, steps=4, guidance=4.0)
    cfg = SampleConfig(prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "run"), model="tiny", model_path=folder,
                       candidates=1, device="cpu", **settings)  # fmt: skip
    manifest = run_sample(cfg)
    rows = read_manifest(manifest, "samples").to_pylist()
    pipe = WanPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for row in rows:
        ours = load_latents([resolve(manifest, row["latent"])])[0]
        theirs = pipe(
            prompt=row["prompt"], negative_prompt="", num_frames=9, height=32, width=32, num_inference_steps=4,
            guidance_scale=4.0, max_sequence_length=TINY_TEXT_LEN, output_type="latent",
            generator=torch.Generator().manual_seed(row["seed"]),
        ).frames[0]  # fmt: skip
        assert ours.abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_pretraining_stages_run_and_save_a_loadable_tiny_model(tmp_path):
    """The three stages of ``vpotool.world.pretrain`` at a toy size: the VAE and the denoiser change, the latent
    statistics land in the VAE config, and the saved folder loads as ``--model tiny`` and samples."""
    import time

    from vpotool.models import load_backend
    from vpotool.stages.sample import generate
    from vpotool.world.pretrain import encode_dataset, train_denoiser, train_vae

    pipe = build_tiny_pipeline(seed=0)
    t0 = time.perf_counter()
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    phase = dict(steps=2, schedule=2, window=5, batch=2, lr=1e-3, kl=1e-4, fg_weight=2.0)
    assert train_vae(pipe.vae, phase, seed=0, t0=t0) > 0
    assert any(not torch.equal(v, pipe.vae.state_dict()[k]) for k, v in vae_before.items())
    latents, captions = encode_dataset(pipe.vae, 4, seed=1, batch=2)
    assert latents.shape == (4, 16, 5, 8, 8) and len(captions) == 4
    assert len(pipe.vae.config.latents_mean) == 16
    den_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    assert train_denoiser(pipe, latents, captions, steps=2, batch=2, lr=1e-3, drop=0.5, seed=2, t0=t0) > 0
    assert any(not torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in den_before.items())
    pipe.save_pretrained(tmp_path / "tiny")
    backend = load_backend("tiny", str(tmp_path / "tiny"))
    settings = dict(frames=5, height=16, width=16, steps=2, guidance=4.0, noise_level=0.0, sampler="pipeline")
    _, frames = generate(backend, [PROMPTS[0]], [0], settings)
    assert frames.shape == (1, 5, 3, 16, 16) and torch.isfinite(frames).all()


def test_the_flow_shift_comes_from_the_checkpoints_scheduler(tmp_path):
    """The shift of training timesteps and of the Euler grid is the saved scheduler's: ``shift`` of the tiny
    model's Euler scheduler (2), ``flow_shift`` of a Wan folder's UniPC scheduler (set to 5 here)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from families import make_tiny_checkpoint

    from vpotool.models import load_backend

    assert load_backend("tiny").shift == 2.0
    folder = make_tiny_checkpoint("wan", tmp_path / "wan")
    pipe = WanPipeline.from_pretrained(folder)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    pipe.save_pretrained(folder)
    assert load_backend("wan", folder).shift == 5.0
