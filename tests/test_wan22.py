"""Wan 2.2 A14B's two experts: routing by timestep, sampling equal to ``WanPipeline`` with ``transformer_2``, and
a LoRA adapter per expert that diffusers loads into each expert."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILY_SIZES, TEXT_LEN, make_tiny_wan22

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.models.experts import TimestepExperts


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return make_tiny_wan22(tmp_path_factory.mktemp("wan22") / "ckpt")


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 3, 4, 4, generator=g), torch.randn(n, TEXT_LEN, 32, generator=g)


def test_loads_both_experts_with_the_pipeline_boundary(wan22):
    backend = load_backend("wan", wan22)
    assert isinstance(backend.denoiser, TimestepExperts)
    assert backend.denoiser.boundary == pytest.approx(900.0)  # boundary_ratio 0.9 x 1000 training timesteps


def test_mixed_batch_routes_each_entry_to_its_expert(wan22):
    """Entries at t >= boundary go through ``transformer``, the others through ``transformer_2``, in one call."""
    experts = load_backend("wan", wan22).denoiser
    x, text = _inputs(3)
    t = torch.tensor([950.0, 400.0, 900.0])
    with torch.no_grad():
        mixed = experts(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
        for i, expert in enumerate([experts.transformer, experts.transformer_2, experts.transformer]):
            alone = expert(hidden_states=x[i : i + 1], timestep=t[i : i + 1], encoder_hidden_states=text[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone[0], atol=1e-6, rtol=1e-5)
        other = experts.transformer_2(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=text[:1])[0]
    assert (other - mixed[:1]).abs().max() > 1e-3  # the experts differ


@pytest.mark.parametrize("sampler", ["pipeline", "euler"])
def test_sample_equals_wan_pipeline_with_transformer_2(sampler, wan22, tmp_path):
    """``vpotool sample`` on a two-expert folder gives ``WanPipeline``'s latents (UniPC, guidance, both experts)
    with ``--sampler pipeline``; both samplers differ from the high-noise expert alone."""
    from diffusers import WanPipeline

    from vpotool.config import SampleConfig
    from vpotool.latents import load_latents
    from vpotool.manifest import read_manifest, resolve
    from vpotool.stages.sample import run_sample

    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    frames, height, width = FAMILY_SIZES["wan"]
    size = dict(frames=frames, height=height, width=width, steps=6, guidance=4.0, device="cpu")
    cfg = SampleConfig(prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "run"), model="wan", model_path=wan22,
                       candidates=1, sampler=sampler, **size)  # fmt: skip
    manifest = run_sample(cfg)
    row = read_manifest(manifest, "samples").to_pylist()[0]
    ours = load_latents([resolve(manifest, row["latent"])])[0]
    pipe = WanPipeline.from_pretrained(wan22)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.9
    kwargs = dict(
        prompt=row["prompt"], num_frames=frames, height=height, width=width, num_inference_steps=6,
        guidance_scale=4.0, max_sequence_length=TEXT_LEN, output_type="latent",
    )  # fmt: skip
    theirs = pipe(**kwargs, generator=torch.Generator().manual_seed(row["seed"])).frames[0]
    if sampler == "pipeline":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    pipe.register_modules(transformer_2=None)
    pipe.register_to_config(boundary_ratio=None)
    one_expert = pipe(**kwargs, generator=torch.Generator().manual_seed(row["seed"])).frames[0]
    assert (ours - one_expert).abs().max() > 1e-3


def test_adapter_per_expert_trains_saves_and_loads_into_diffusers(wan22, tmp_path):
    """train-dpo on a two-expert model trains an adapter on each expert; the saved file keeps them under
    ``transformer.`` and ``transformer_2.``; ``load_adapter`` and diffusers' ``load_lora_adapter`` (with each
    expert's prefix) give the trained outputs."""
    from diffusers import WanPipeline
    from safetensors import safe_open

    from vpotool.training.lora import add_lora, load_adapter, save_adapter

    trained = load_backend("wan", wan22)
    params = add_lora(trained.denoiser, rank=4, alpha=8, targets=trained.lora_target_modules)
    assert {n.split(".")[0] for n, p in trained.denoiser.named_parameters() if p.requires_grad} == {
        "transformer",
        "transformer_2",
    }
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(trained.denoiser, tmp_path / "adapter", {"base_model": "wan"})
    path = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer", "transformer_2"}
    assert json.loads(meta["lora_adapter_metadata"])["transformer_2.lora_alpha"] == 8

    x, text = _inputs(2, seed=3)
    t = torch.tensor([950.0, 300.0])
    with torch.no_grad():
        expected = trained.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
        loaded = load_backend("wan", wan22)
        load_adapter(loaded, tmp_path / "adapter")
        ours = loaded.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
        pipe = WanPipeline.from_pretrained(wan22)
        for name in ("transformer", "transformer_2"):
            getattr(pipe, name).load_lora_adapter(str(path.parent), weight_name=path.name, prefix=name)
        theirs = torch.cat([
            pipe.transformer(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=text[:1])[0],
            pipe.transformer_2(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=text[1:])[0],
        ])  # fmt: skip
        base = load_backend("wan", wan22).denoiser(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
    assert (expected - base)[0].abs().max() > 1e-2 and (expected - base)[1].abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-6, rtol=1e-5)


def test_train_dpo_moves_both_experts(wan22, tmp_path, cli, prompts_file):
    """A few DPO steps on a two-expert model: the timesteps fall on both sides of the boundary and both
    experts' adapters move."""
    from safetensors.torch import load_file
    from test_train_dpo import family_args, run_chain

    run = tmp_path / "run"
    run_chain(cli, prompts_file, run, *family_args("wan", wan22))
    args = ("--model", "wan", "--model-path", wan22, "--pairs", run / "pairs.parquet", "--out", run / "dpo")
    code, _, err = cli("train-dpo", *args, "--max-steps", 4, "--batch-size", 2, "--lr", 0.05, "--lora-rank", 2,
                       "--beta", 100, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    state = load_file(str(run / "dpo" / "checkpoints" / "step-4" / "pytorch_lora_weights.safetensors"))
    for expert in ("transformer", "transformer_2"):
        moved = [v.abs().max() for k, v in state.items() if k.startswith(f"{expert}.") and "lora_B" in k]
        assert moved and max(moved) > 0, expert


def test_half_a_two_expert_layout_is_refused(wan22, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(wan22, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = None
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(VpoError, match="transformer_2 but no boundary_ratio"):
        load_backend("wan", str(folder))


@pytest.mark.parametrize("steps", [10, 20])
def test_euler_step_on_the_boundary_goes_to_the_expert_diffusers_picks(wan22, steps):
    """Wan 2.2's boundary 0.875 x 1000 falls on a grid point of the shift-3 Euler grid at 10, 20, 30 ... steps.
    ``--sampler euler`` computes that grid as diffusers' ``FlowMatchEulerDiscreteScheduler`` does (float32: the
    point is 874.99994), so the step goes to the low-noise expert, where a float64 shift (875.0) sent it to the
    high-noise one."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    backend = load_backend("wan", wan22)
    assert backend.euler_scheduler is None and backend.shift == 3.0  # the UniPC checkpoint: vpotool's own grid
    grid = backend.schedule(steps)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    assert torch.equal(grid.timesteps, reference.timesteps) and torch.equal(grid.sigmas, reference.sigmas)
    on_boundary = grid.timesteps[int(0.3 * steps)]
    assert 874.999 < on_boundary < 875.0
    experts = TimestepExperts(backend.denoiser.transformer, backend.denoiser.transformer_2, 0.875 * 1000)
    x, text = _inputs(1)
    with torch.no_grad():
        routed = experts(hidden_states=x, timestep=on_boundary[None], encoder_hidden_states=text)[0]
        low = experts.transformer_2(hidden_states=x, timestep=on_boundary[None], encoder_hidden_states=text)[0]
    torch.testing.assert_close(routed, low, atol=0, rtol=0)
